"""The accelerator against the public HTTP caching test suite (cache-tests, npm
`http-cache-tests` 0.4.5), installed into a temporary directory at test time.

Strata runs the accelerator alone, fronting the suite's own origin server as an arbitrary
upstream. The results are scored with the suite's classification (tests/conformance/score.mjs)
and compared test by test with the suite's published Varnish results. Gate: at least 125
required tests pass (Varnish 119, the best cache 132), none fails in the Vary, Cache-Control,
invalidation or authorization groups, and nothing Varnish passes fails here
(apart from the deviation named below, with its reason).
"""

import json
import os
import shutil
import subprocess

import pytest

from conftest import ROOT, free_port, wait_for_port

SUITE = "http-cache-tests@0.4.5"
# Varnish passes these and Strata does not, on purpose:
# - age-parse-float expects `Age: 7200.0` to make the response stale. RFC 9111 §5.1: a cache
#   "SHOULD ignore the field" when its value is not a non-negative integer, which Strata does
#   for this value as for `abc`, `-7200` and `7200;foo=bar` (the suite wants all of those
#   stale too; Varnish ignores those three, and reads `7200.0` as 7200).
KNOWN_DEVIATIONS = {"age-parse/age-parse-float"}
STRICT_GROUPS = {"vary", "vary-parse", "cc-response", "cc-freshness", "cc-parse",
                 "invalidation", "auth"}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.fail("node and npm are needed to run the HTTP caching test suite")
    where = tmp_path_factory.mktemp("cache-tests")
    subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix",
                    str(where), SUITE], check=True, timeout=300)
    return where / "node_modules" / "http-cache-tests"


@pytest.fixture
def origin(suite, tmp_path):
    port = free_port()
    env = dict(os.environ, npm_config_protocol="http", npm_config_port=str(port),
               npm_config_pidfile=str(tmp_path / "origin.pid"))
    process = subprocess.Popen(["node", "server/server.mjs"], cwd=suite, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for_port(port, 30, process), "the suite's origin server did not start"
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(10)


def test_cache_tests_suite(strata, suite, origin, tmp_path):
    server = strata("--tiers", "lb,accelerator", "--upstream", origin)
    env = dict(os.environ, npm_config_base=f"http://127.0.0.1:{server.port}",
               npm_package_config_id="")
    run = subprocess.run(["node", "--no-warnings", "cli.mjs"], cwd=suite, env=env,
                         capture_output=True, text=True, timeout=600)
    results = tmp_path / "results.json"
    results.write_text(run.stdout)
    scored = subprocess.run(
        ["node", str(ROOT / "tests" / "conformance" / "score.mjs"), str(suite), str(results),
         str(suite / "results" / "varnish.json")],
        check=True, capture_output=True, text=True)
    summary = json.loads(scored.stdout)
    print(json.dumps(summary, indent=2))
    required = summary["required"]
    assert required.get("pass", 0) >= 125, required
    strict_failures = [f for f in summary["failed"] if f.split("/")[0] in STRICT_GROUPS]
    assert not strict_failures, strict_failures
    worse = [w for w in summary["worse_than_reference"]
             if w.split(":")[0] not in KNOWN_DEVIATIONS]
    assert not worse, worse

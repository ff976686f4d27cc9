"""memcached's own test suite (`t/*.t` from Debian's source package of memcached 1.6) against
the cache tier: each file aimed at a fresh Strata with `T_MEMD_USE_DAEMON`, as memcached's
harness allows.

The bar: against Debian's memcached 1.6.18, started the same way (one fresh server per
file), these files pass with tests that run (others pass only by skipping themselves, or fail
on memcached too). Every one of them must pass against Strata, but for the files below that
read memcached's slab allocator, which Strata does not have. `t/metaget.t` runs with its
extstore part left out (it starts a memcached of its own with an extstore file).

.ci/run adds Debian's `deb-src` line and installs `memcached` (the harness runs `memcached -h`
to learn which features to test), `dpkg-dev` and the suite's Perl modules.
"""

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import Strata

# Pass against Debian's memcached 1.6.18 with tests that run.
PASSING_ON_MEMCACHED = [
    "binary-get.t", "bogus-commands.t", "cas.t", "chunked-items.t", "flags.t",
    "getandtouch.t", "getset.t", "incrdecr.t", "issue_104.t", "issue_108.t", "issue_14.t",
    "issue_152.t", "issue_163.t", "issue_192.t", "issue_29.t", "issue_3.t", "issue_41.t",
    "issue_42.t", "issue_68.t", "issue_70.t", "line-lengths.t", "malicious-commands.t",
    "multiversioning.t", "noreply.t", "quit.t", "stats-detail.t", "strtol-testing.t",
    "touch.t", "watcher_connid.t",
]

# Files that read memcached's slab allocator: what they read, and the tests of theirs that
# fail for it (every other test in them passes).
SLAB_INTERNALS = {
    "issue_29.t": ("counts chunks in slab class 1 (`stats slabs` 1:used_chunks)",
                   ["Used one", "Used two"]),
    "issue_42.t": ("reads slab class 1's chunk size and requested bytes (`stats slabs`, "
                   "`stats items` items:1:mem_requested)", ["Check allocated size"]),
    "issue_163.t": ("reads slab class 31's reclaimed count (`stats items` items:31:reclaimed)",
                    ["Objects should be reclaimed"]),
}


@pytest.fixture(scope="session")
def memcached_t(tmp_path_factory):
    """The `t/` folder of Debian's memcached source, with metaget.t's extstore part left out."""
    exe = shutil.which("memcached")
    assert exe, "memcached is needed for its suite's feature checks (apt-get install memcached)"
    root = tmp_path_factory.mktemp("memcached-src")
    result = subprocess.run(["apt-get", "source", "-q", "memcached"], cwd=root,
                            capture_output=True, text=True, timeout=300)
    sources = [p for p in root.glob("memcached-*") if p.is_dir()]
    assert sources, ("apt-get source memcached failed (is a deb-src line configured?):\n"
                     + result.stdout + result.stderr)
    source = sources[0]
    (source / "memcached-debug").symlink_to(exe)
    metaget = (source / "t" / "metaget.t").read_text()
    marker = "if (supports_extstore()) {"
    assert marker in metaget
    (source / "t" / "metaget-no-extstore.t").write_text(
        metaget.replace(marker, "if (0) { # the extstore part is left out"))
    return source


def run_file(source, tmp_path, name):
    """Runs `t/<name>` against a fresh Strata; returns (passed, prove's output)."""
    server = Strata(tmp_path, ["--tiers", "cache"])
    try:
        env = dict(os.environ, T_MEMD_USE_DAEMON=f"127.0.0.1:{server.cache_port}")
        try:
            result = subprocess.run(["prove", f"t/{name}"], cwd=source, env=env,
                                    capture_output=True, text=True, errors="replace",
                                    timeout=120)
        except subprocess.TimeoutExpired:
            return False, f"{name}: timed out after 120 s"
        return result.returncode == 0, result.stdout + result.stderr
    finally:
        server.stop()


def test_memcacheds_own_suite_passes_against_strata(memcached_t, tmp_path):
    files = [f for f in PASSING_ON_MEMCACHED if f not in SLAB_INTERNALS]
    files.append("metaget-no-extstore.t")
    with ThreadPoolExecutor(2) as pool:
        outcomes = dict(zip(files, pool.map(
            lambda name: run_file(memcached_t, tmp_path, name), files)))
    failed = {name: output[-2000:] for name, (passed, output) in outcomes.items()
              if not passed}
    assert not failed, "\n\n".join(f"== {name}\n{output}" for name, output in failed.items())
    # Each file really ran tests (a file that skips itself would pass without any).
    for name, (_, output) in outcomes.items():
        assert "skipped" not in output.split("\n", 1)[0], output


def test_the_slab_exceptions_fail_only_where_they_read_slab_statistics(memcached_t, tmp_path):
    for name, (reason, expected) in SLAB_INTERNALS.items():
        passed, output = run_file(memcached_t, tmp_path, name)
        failed = re.findall(r"^#   Failed test '([^']*)'", output, re.M)
        assert not passed, name
        assert len(failed) == len(expected) and all(
            f.startswith(e) for f, e in zip(failed, expected)), (name, reason, output[-2000:])

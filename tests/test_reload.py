"""Deploys without errors: a new generation is warmed beside the old one and replaces it
worker by worker; a broken deploy leaves the old generation serving."""

import signal
import subprocess
import threading
import time

import requests

from conftest import STRATA, VENV, children, wait_until

APP = """
import time
VERSION = {version!r}
time.sleep(0.3)  # a project that takes a while to import


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [VERSION.encode()]
"""


class Load:
    """Clients sending requests back to back, recording every outcome."""

    def __init__(self, url, clients=4, verify=True):
        self.url = url
        self.verify = verify
        self.results = []  # (started, finished, status or exception text, body)
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def run(self):
        session = requests.Session()
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                response = session.get(self.url, timeout=10, verify=self.verify)
                outcome = (started, time.monotonic(), response.status_code, response.text)
            except requests.RequestException as error:
                outcome = (started, time.monotonic(), repr(error), "")
            self.results.append(outcome)

    def wait_for(self, more):
        """Waits until `more` requests have completed since the call."""
        target = len(self.results) + more
        assert wait_until(lambda: len(self.results) >= target), "the load stalled"

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join()
        return self.results


def deploy(tmp_path, version):
    (tmp_path / "deployed.py").write_text(APP.format(version=version))


def start(strata, tmp_path, version="v1", **kwargs):
    deploy(tmp_path, version)
    return strata("--app", "deployed", "--chdir", str(tmp_path), "--virtualenv", str(VENV),
                  "--workers", "2", env={"PYTHONDONTWRITEBYTECODE": "1"}, **kwargs)


def reload(server):
    return subprocess.run([str(STRATA), "reload", "--admin", f"127.0.0.1:{server.admin_port}"],
                          capture_output=True, text=True, timeout=120, cwd=server.log_path.parent)


def test_five_reloads_under_load_without_errors(strata, tmp_path):
    server = start(strata, tmp_path)
    load = Load(server.url("/"))
    done_at = {}
    for n in range(2, 7):
        load.wait_for(40)
        deploy(tmp_path, f"v{n}")
        result = reload(server)
        assert result.returncode == 0, result.stderr
        assert f"generation {n}" in result.stdout
        done_at[n] = time.monotonic()
    load.wait_for(40)
    results = load.stop()
    failures = [r for r in results if r[2] != 200]
    assert not failures, failures[:5]
    assert len(results) > 200
    # Once a reload has completed, every request that starts afterwards sees its code.
    for started, _, _, body in results:
        newest = max((n for n, at in done_at.items() if at <= started), default=1)
        assert int(body[1:]) >= newest, (started, body, newest)
    status = server.status()["app"]
    assert status["generation"] == 6
    assert {w["generation"] for w in status["workers"]} == {6}
    assert len(status["workers"]) == 2
    assert status["last_reload"] == {"state": "done", "generation": 6}
    # The old generations' zygotes are gone.
    assert wait_until(lambda: len(children(server.process.pid)) == 1)


def test_broken_deploy_keeps_the_old_code_serving(strata, tmp_path):
    server = start(strata, tmp_path)
    load = Load(server.url("/"))
    (tmp_path / "deployed.py").write_text("import this_module_is_missing\n")
    result = reload(server)
    assert result.returncode != 0
    assert "ModuleNotFoundError: No module named 'this_module_is_missing'" in result.stderr
    assert "keeps serving" in result.stderr
    status = server.status()["app"]
    assert status["generation"] == 1
    assert status["last_reload"]["state"] == "failed"
    assert "this_module_is_missing" in status["last_reload"]["error"]
    deploy(tmp_path, "v2")
    assert reload(server).returncode == 0
    load.wait_for(20)
    results = load.stop()
    assert [r for r in results if r[2] != 200] == []
    assert {r[3] for r in results} <= {"v1", "v2"}
    assert requests.get(server.url("/")).text == "v2"


def test_sighup_reloads(strata, tmp_path):
    server = start(strata, tmp_path)
    deploy(tmp_path, "v2")
    server.signal(signal.SIGHUP)
    assert wait_until(lambda: server.status()["app"].get("last_reload", {})
                      == {"state": "done", "generation": 2}, timeout=30)
    assert requests.get(server.url("/")).text == "v2"
    assert "SIGHUP reload done" in server.log()


def test_reload_while_reloading_is_refused(strata, tmp_path):
    server = start(strata, tmp_path)
    deploy(tmp_path, "v2")
    first = subprocess.Popen([str(STRATA), "reload", "--admin", f"127.0.0.1:{server.admin_port}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=tmp_path)
    assert wait_until(lambda: (server.status()["app"].get("last_reload") or {}).get("state")
                      in ("starting", "rolling"))
    second = reload(server)
    assert second.returncode != 0 and "already in progress" in second.stderr
    assert first.wait(timeout=60) == 0


def test_reload_applies_app_settings_and_names_the_rest(strata, tmp_path):
    deploy(tmp_path, "v1")
    config = tmp_path / "live.toml"
    config.write_text("[app]\nworkers = 2\n")
    server = strata("--config", str(config), "--app", "deployed", "--chdir", str(tmp_path),
                    "--virtualenv", str(VENV), env={"PYTHONDONTWRITEBYTECODE": "1"})
    config.write_text("[app]\nworkers = 3\nqueue_length = 5\n[lb]\nmax_headers = 50\n")
    result = reload(server)
    assert result.returncode == 0, result.stderr
    assert "need a restart: lb.max_headers" in result.stdout
    status = server.status()["app"]
    assert len(status["workers"]) == 3 and {w["generation"] for w in status["workers"]} == {2}
    config.write_text("[app]\nworkers = 1\n")
    assert reload(server).returncode == 0
    # A reload reports success once the workers it retired have left.
    assert len(server.status()["app"]["workers"]) == 1
    config.write_text("[app]\nworkers = -1\n")
    result = reload(server)
    assert result.returncode != 0 and "invalid configuration" in result.stderr
    assert server.status()["app"]["generation"] == 3
    assert requests.get(server.url("/")).text == "v1"

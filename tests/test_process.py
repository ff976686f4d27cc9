"""The process model: titles, warm start, failures at start-up, the Python environment."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from conftest import APPS, STRATA, app, children, free_port


def cmdline(pid):
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def test_process_titles(strata):
    server = strata(*app("hello", "--workers", "2"))
    assert cmdline(server.process.pid).startswith("strata master")
    (zygote,) = children(server.process.pid)
    assert cmdline(zygote) == "strata zygote gen=1"
    for worker in server.status()["app"]["workers"]:
        assert cmdline(worker["pid"]) == f"strata worker id={worker['id']} gen=1"
        # Workers are forked by the zygote, not spawned by the master.
        assert worker["pid"] in children(zygote)


def test_probes_need_no_token_and_the_rest_does(strata):
    """Kubernetes' probes carry no token: /livez (and /healthz) and /readyz answer without
    one on an admin listener that requires it; everything else still needs it."""
    server = strata(*app("hello"), config='[admin]\ntoken = "s3cret"\n')
    for probe in ["/livez", "/healthz"]:
        answer = server.admin(probe)
        assert answer.status_code == 200 and answer.text == "ok\n", probe
    ready = server.admin("/readyz")
    assert ready.status_code == 200 and ready.text == "ready\n", ready.text
    assert server.admin("/status").status_code == 401
    assert server.admin("/metrics").status_code == 401
    url = f"http://127.0.0.1:{server.admin_port}/readyz"
    assert requests.post(url, headers={"Authorization": "Bearer s3cret"}).status_code == 405


def test_nothing_listens_before_the_app_is_warm(strata):
    server = strata(*app("slow_import"), wait=False)
    time.sleep(1.0)
    assert server.process.poll() is None
    refused = False
    try:
        socket.create_connection(("127.0.0.1", server.port), timeout=0.5).close()
    except ConnectionRefusedError:
        refused = True
    assert refused, "the port must not accept while the application is importing"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            assert requests.get(server.url("/"), timeout=5).text == "warm"
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise AssertionError(server.log())


def run_to_exit(cwd, *args):
    """Runs `strata run` that is expected to exit by itself."""
    return subprocess.run(
        [str(STRATA), "run", "--bind", f"127.0.0.1:{free_port()}", "--admin",
         f"127.0.0.1:{free_port()}", *args],
        capture_output=True, text=True, timeout=60, cwd=cwd)


def test_import_failure_exits_with_the_traceback(tmp_path):
    result = run_to_exit(tmp_path, *app("broken_import"))
    assert result.returncode != 0
    assert "cannot import the application module `broken_import`" in result.stderr
    assert "ModuleNotFoundError: No module named 'module_that_does_not_exist'" in result.stderr
    assert "broken_import.py" in result.stderr
    assert str(APPS) in result.stderr


def test_missing_callable_is_reported(tmp_path):
    result = run_to_exit(tmp_path, *app("hello:nope"))
    assert result.returncode != 0
    assert "has no callable `nope`" in result.stderr


def test_warm_up_runs_in_the_zygote_and_in_each_worker(strata):
    server = strata(*app("warm_probe", "--workers", "2"), config='[app]\nwarmup_paths = ["/warm"]\n')
    assert "warm-up GET /warm -> 200 OK" in server.log()
    body = requests.get(server.url("/")).json()
    zygote = children(server.process.pid)[0]
    assert body["imported_in"] == zygote
    assert body["served_by"] != zygote
    # Warmed in the zygote before fork, then again in the worker before its first request.
    assert body["warmed_in"] == [zygote, body["served_by"]]
    assert body["frozen"] > 0, "gc.freeze() ran before fork"
    assert body["gc_enabled"], "workers collect garbage again"


def test_virtualenv_and_no_python_environment_variables(tmp_path, strata):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = venv / "lib" / version / "site-packages"
    (site / "only_in_venv.py").write_text("GREETING = b'from the venv'\n")
    (tmp_path / "venv_app.py").write_text(
        "import only_in_venv\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [only_in_venv.GREETING]\n")
    clean = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    server = strata("--app", "venv_app", "--chdir", str(tmp_path), "--virtualenv", str(venv), env=clean)
    assert requests.get(server.url("/")).text == "from the venv"
    worker = server.worker_pids()[0]
    maps = Path(f"/proc/{worker}/maps").read_text()
    libpython = {line.split()[-1] for line in maps.splitlines() if "libpython3" in line}
    assert libpython == {str(Path(sys.base_prefix) / "lib" / "libpython3.11.so.1.0")}, libpython


def nice(pid):
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[16])


def test_warm_up_yields_the_cpu_and_workers_serve_at_normal_priority(strata):
    server = strata(*app("hello", "--workers", "2"), config="[app]\nwarmup_nice = 7\n")
    (zygote,) = children(server.process.pid)
    assert nice(zygote) == 7
    for pid in server.worker_pids():
        assert nice(pid) == 0
    assert nice(server.process.pid) == 0

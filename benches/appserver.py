"""App server benchmark driver (run through benches/appserver.sh).

Method (../shared/BENCHMARKS.md): servers pinned to core 0, wrk to core 1; every server of a
workload is started up front; each round measures each server once in rotated order; each
server's figure is its median over the rounds, after a discarded warm-up. The ceiling is the
application called in a tight in-process loop with a fresh environ per call, run as two
processes sharing core 0.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import RESULTS, ROOT, STRATA, VENV, free_port, wait_port

WORKLOADS = {
    "wsgi-hello": {"module": "hello", "callable": "application", "chdir": ROOT / "tests" / "apps",
                   "path": "/"},
    "django-view": {"module": "mysite.wsgi", "callable": "application", "chdir": ROOT / "example",
                    "path": "/"},
}


def servers_for(workload, env):
    spec = WORKLOADS[workload]
    target = f"{spec['module']}:{spec['callable']}"
    chdir = str(spec["chdir"])
    pin = ["taskset", "-c", "0"]
    servers = {}
    port = free_port()
    servers["strata"] = (port, pin + [str(STRATA), "run", "--app", target, "--chdir", chdir,
                                      "--virtualenv", str(VENV), "--workers", "2",
                                      "--bind", f"127.0.0.1:{port}",
                                      "--admin", f"127.0.0.1:{free_port()}"])
    port = free_port()
    servers["gunicorn-sync"] = (port, pin + [str(VENV / "bin" / "gunicorn"), "--workers", "2",
                                             "--worker-class", "sync", "--chdir", chdir,
                                             "--bind", f"127.0.0.1:{port}", "--log-level", "warning",
                                             target])
    port = free_port()
    servers["granian"] = (port, pin + [str(VENV / "bin" / "granian"), "--interface", "wsgi",
                                       "--workers", "2", "--host", "127.0.0.1", "--port", str(port),
                                       "--working-dir", chdir, "--log-level", "warning", target])
    return servers


def wrk(port, path, seconds):
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c32", f"-d{seconds}s", "--latency",
                          f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in m.groups())
    return {"rps": rps, "p99_ms": float(p99.group(1)) * scale, "errors": errors}


CEILING = r"""
import io, os, sys, time
sys.path.insert(0, {chdir!r}); os.chdir({chdir!r})
module = __import__({module!r}, fromlist=["x"])
app = getattr(module, {callable!r})
base = {{"REQUEST_METHOD": "GET", "PATH_INFO": {path!r}, "SCRIPT_NAME": "", "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "127.0.0.1", "REMOTE_ADDR": "127.0.0.1", "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr, "wsgi.multithread": False,
        "wsgi.multiprocess": True, "wsgi.run_once": False}}
def start_response(status, headers, exc_info=None):
    return lambda data: None
def call():
    environ = dict(base); environ["wsgi.input"] = io.BytesIO(b"")
    result = app(environ, start_response)
    for _ in result: pass
    if hasattr(result, "close"): result.close()
for _ in range(200): call()
# As in a warm worker: what survives warm-up is frozen out of the collector's scans.
import gc; gc.collect(); gc.freeze()
n = 0; end = time.perf_counter() + {seconds}
while time.perf_counter() < end:
    call(); n += 1
print(n / {seconds})
"""


def ceiling(workload, env, seconds=5):
    spec = WORKLOADS[workload]
    code = CEILING.format(chdir=str(spec["chdir"]), module=spec["module"], callable=spec["callable"],
                          path=spec["path"], seconds=seconds)
    procs = [subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", code], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    return sum(float(p.communicate()[0]) for p in procs)


def run_workload(workload, rounds, seconds, env):
    servers = servers_for(workload, env)
    procs = {}
    try:
        for name, (port, command) in servers.items():
            procs[name] = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, start_new_session=True)
        for name, (port, _) in servers.items():
            wait_port(port)
            wrk(port, WORKLOADS[workload]["path"], 3)  # discarded warm-up
        results = {name: [] for name in servers}
        names = list(servers)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                results[name].append(wrk(servers[name][0], WORKLOADS[workload]["path"], seconds))
    finally:
        for proc in procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    summary = {}
    for name, runs in results.items():
        summary[name] = {
            "rps": statistics.median(r["rps"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
        }
    return summary


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--workloads", default="wsgi-hello,django-view")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="strata-bench-"))
    env = dict(os.environ, EXAMPLE_DB=str(tmp / "db.sqlite3"), DJANGO_SETTINGS_MODULE="mysite.settings")
    env.pop("EXAMPLE_DEBUG", None)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT / "example", env=env, check=True)

    lines = [f"# App server benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}", "",
             f"2 workers each on core 0, wrk -t1 -c32 -d{args.seconds}s on core 1, "
             f"median of {args.rounds} rounds; ratios are Strata / other.", ""]
    report = {}
    for workload in args.workloads.split(","):
        summary = run_workload(workload, args.rounds, args.seconds, env)
        top = ceiling(workload, env)
        report[workload] = {"servers": summary, "ceiling_calls_per_s": top}
        s = summary["strata"]
        lines += [f"## {workload}", "",
                  "| server | req/s | p99 ms | errors | Strata req/s ratio | Strata p99 ratio |",
                  "|---|---|---|---|---|---|"]
        for name, row in summary.items():
            lines.append(f"| {name} | {row['rps']:.0f} | {row['p99_ms']:.2f} | {row['errors']} | "
                         f"{s['rps'] / row['rps']:.2f} | {s['p99_ms'] / row['p99_ms']:.2f} |")
        lines += ["", f"Ceiling (app in a tight loop, 2 processes on core 0): {top:.0f} calls/s; "
                      f"Strata reaches {s['rps'] / top:.1%} of it.", ""]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = f"{datetime.datetime.now():%Y%m%d-%H%M}"
    (RESULTS / f"appserver-{stamp}.md").write_text(text + "\n")
    (RESULTS / f"appserver-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

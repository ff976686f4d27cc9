"""App server benchmark driver (run through benches/appserver.sh).

Method (../shared/BENCHMARKS.md): servers pinned to core 0, wrk to core 1; every server of a
workload is started up front; each round measures each server once in rotated order; each
server's figure is its median over the rounds, after a discarded warm-up. The ceiling is the
application called in a tight in-process loop with a fresh environ per call, run as two
processes sharing core 0.
"""

import argparse
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import ROOT, STRATA, VENV, free_port, measure, save, table

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
    # The app server alone: the accelerator would answer the cacheable Django page itself.
    servers["strata"] = (port, pin + [str(STRATA), "run", "--tiers", "lb,app",
                                      "--app", target, "--chdir", chdir,
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
    """The servers' figures, and the ceiling measured once per round (in the same minute as
    that round's servers, as this machine's speed moves from minute to minute)."""
    ceilings = []
    summary = measure(servers_for(workload, env), WORKLOADS[workload]["path"], rounds, seconds,
                      env, each_round=lambda: ceilings.append(ceiling(workload, env)))
    return summary, ceilings


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
        summary, ceilings = run_workload(workload, args.rounds, args.seconds, env)
        top = statistics.median(ceilings)
        shares = [r["rps"] / c for r, c in zip(summary["strata"]["rounds"], ceilings)]
        report[workload] = {"servers": summary, "ceiling_calls_per_s": ceilings}
        lines += [f"## {workload}", "", *table(summary), "",
                  f"Ceiling (app in a tight loop, 2 processes on core 0, measured in every round): "
                  f"{top:.0f} calls/s; Strata reaches {statistics.median(shares):.1%} of it "
                  f"(by round: {', '.join(f'{x:.1%}' for x in shares)}).", ""]
    save("appserver", lines, report)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

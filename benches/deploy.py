"""Deploy benchmark (run through benches/deploy.sh): the same load and the same five code
changes against Strata (`strata reload`) and Gunicorn (SIGHUP, without --preload), in one run.

Each server serves its own copy of the example Django site with 2 workers pinned to core 0;
a closed-loop client (8 concurrent connections, core 1) records every request's latency.
Every `--interval` seconds the copy's views module changes and the server is told to reload.
A steady phase as long as the deploy phase comes first. Reported per server: errors, the
steady p99, the worst one-second-window p99 of the steady phase (the noise floor of a
one-second p99 on this machine), and the worst one-second-window p99 from the first deploy to
the end; a PNG plots p99 per second.
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from benchlib import RESULTS, ROOT, STRATA, VENV, free_port, wait_port


def copy_site(tmp, name):
    site = tmp / name
    shutil.copytree(ROOT / "example", site, ignore=shutil.ignore_patterns("db.sqlite3", "__pycache__"))
    return site


def change_code(site, n):
    views = site / "blog" / "views.py"
    text = views.read_text().split("\n# deploy ")[0]
    views.write_text(text + f"\n# deploy {n}\nDEPLOY = {n}\n")


class Load(threading.Thread):
    def __init__(self, url, clients):
        super().__init__(daemon=True)
        self.url, self.clients = url, clients
        self.samples = []  # (start, latency seconds, ok)
        self.stop_flag = threading.Event()

    def client(self):
        session = requests.Session()
        while not self.stop_flag.is_set():
            start = time.monotonic()
            try:
                ok = session.get(self.url, timeout=30).status_code == 200
            except requests.RequestException:
                ok = False
            self.samples.append((start, time.monotonic() - start, ok))

    def run(self):
        threads = [threading.Thread(target=self.client, daemon=True) for _ in range(self.clients)]
        for t in threads:
            t.start()
        self.stop_flag.wait()
        for t in threads:
            t.join()


def p99(values):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * 0.99))] if values else 0.0


def windows(samples, t0):
    by_second = {}
    for start, latency, ok in samples:
        by_second.setdefault(int(start - t0), []).append(latency)
    return {s: p99(v) * 1000 for s, v in sorted(by_second.items())}


def measure(name, command, env, site, port, reload, args):
    process = subprocess.Popen(command, env=env, cwd=site, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port)
        load = Load(f"http://127.0.0.1:{port}/", args.clients)
        os.sched_setaffinity(0, {1})
        for _ in range(20):
            requests.get(f"http://127.0.0.1:{port}/")
        t0 = time.monotonic()
        load.start()
        steady = args.deploys * args.interval
        time.sleep(steady)
        deploys, durations = [], []
        for n in range(1, args.deploys + 1):
            change_code(site, n)
            started = time.monotonic()
            deploys.append(started - t0)
            reload(process)
            durations.append(time.monotonic() - started)
            time.sleep(max(0.0, started + args.interval - time.monotonic()))
        time.sleep(args.interval)
        load.stop_flag.set()
        load.join()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    samples = load.samples
    per_second = windows(samples, t0)
    first = deploys[0]
    # Whole windows only: the first second warms the clients, the last one is cut short.
    last = max(per_second)
    steady = [s for s in samples if 1 <= s[0] - t0 < first]
    steady_windows = [v for s, v in per_second.items() if 1 <= s < int(first)]
    during = [v for s, v in per_second.items() if int(first) <= s < last]
    return {
        "server": name,
        "requests": len(samples),
        "errors": sum(1 for s in samples if not s[2]),
        "steady_p99_ms": p99([s[1] for s in steady]) * 1000,
        "steady_worst_window_p99_ms": max(steady_windows),
        "worst_window_p99_ms": max(during),
        "reload_seconds": durations,
        "per_second_p99_ms": per_second,
        "deploys_at": deploys,
    }


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for result in results:
        xs = list(result["per_second_p99_ms"].keys())
        ys = list(result["per_second_p99_ms"].values())
        (line,) = ax.plot(xs, ys, marker=".", label=f"{result['server']} ({result['errors']} errors)")
        for at in result["deploys_at"]:
            ax.axvline(at, color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("seconds (dotted: code change + reload, in the server's colour)")
    ax.set_ylabel("p99 latency per second (ms, log)")
    ax.set_title("Five deploys under load: Strata reload vs Gunicorn HUP (example Django site, 2 workers)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--deploys", type=int, default=5)
    parser.add_argument("--interval", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="strata-deploy-"))
    env = dict(os.environ, EXAMPLE_DB=str(tmp / "db.sqlite3"), PYTHONDONTWRITEBYTECODE="1")
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT / "example", env=env, check=True)
    pin = ["taskset", "-c", "0"]
    results = []

    site = copy_site(tmp, "strata-site")
    port, admin = free_port(), free_port()
    # Strata warms each new worker with a request before it takes traffic, as an operator
    # would configure it; Gunicorn has no equivalent.
    config = tmp / "strata.toml"
    config.write_text('[app]\nwarmup_paths = ["/"]\n')
    # The app server alone: the accelerator would answer the cacheable front page itself.
    strata = pin + [str(STRATA), "run", "--config", str(config), "--tiers", "lb,app",
                    "--app", "mysite.wsgi:application", "--chdir", str(site),
                    "--virtualenv", str(VENV), "--workers", "2", "--bind", f"127.0.0.1:{port}",
                    "--admin", f"127.0.0.1:{admin}"]
    reload_strata = lambda _: subprocess.run([str(STRATA), "reload", "--admin", f"127.0.0.1:{admin}"],
                                             check=True, capture_output=True)
    results.append(measure("strata", strata, env, site, port, reload_strata, args))

    site = copy_site(tmp, "gunicorn-site")
    port = free_port()
    gunicorn = pin + [str(VENV / "bin" / "gunicorn"), "--workers", "2", "--chdir", str(site),
                      "--bind", f"127.0.0.1:{port}", "--log-level", "warning", "mysite.wsgi:application"]
    reload_gunicorn = lambda process: os.kill(process.pid, signal.SIGHUP)
    results.append(measure("gunicorn-hup", gunicorn, env, site, port, reload_gunicorn, args))

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = f"{datetime.datetime.now():%Y%m%d-%H%M}"
    png = RESULTS / f"deploy-{stamp}.png"
    plot(results, png)
    (RESULTS / f"deploy-{stamp}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"# Deploy benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}\n")
    print(f"{args.deploys} code changes + reloads, one every {args.interval:g}s, {args.clients} clients; plot: {png}\n")
    print("| server | requests | errors | steady p99 ms | worst 1-s p99, steady ms | "
          "worst 1-s p99, deploys ms | deploys ÷ steady p99 | reload s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio = r["worst_window_p99_ms"] / r["steady_p99_ms"] if r["steady_p99_ms"] else 0
        reloads = "–" if r["server"] != "strata" else f"{statistics.median(r['reload_seconds']):.1f}"
        print(f"| {r['server']} | {r['requests']} | {r['errors']} | {r['steady_p99_ms']:.1f} | "
              f"{r['steady_worst_window_p99_ms']:.1f} | {r['worst_window_p99_ms']:.1f} | "
              f"{ratio:.2f} | {reloads} |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Soak driver (run through benches/soak.sh): does the node's memory stay flat, and does
nothing fail but the requests on workers killed on purpose?

One node runs the example site as `make run` does (scripts/run-example.sh: lb, accelerator,
app, cache and dbpool in front of a private PostgreSQL). Eight client threads loop over a mix:
the cached front page, an article page (uncached, through the pooler), a slow view, an upload
(CSRF token and all), and a view that counts in the cache tier from the workers. Every minute
one worker is killed (SIGKILL), every five minutes the node reloads. Every 10 s the RSS of the
master, the zygote and the workers is sampled. Pass: after the first five minutes the
master's RSS grows less than 5 %, and no request fails but at most one per killed worker.
"""

import argparse
import datetime
import json
import os
import random
import re
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import requests

from benchlib import ROOT, STRATA, free_port, save, wait_port

MIX = ["/", "/", "/", "/articles/1/", "/articles/2/", "/slow/?seconds=0.2", "/visits/",
       "/visits/", "upload"]


def rss_kb(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(pid):
    """Every process below `pid`: (pid, command line)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
            except OSError:
                continue
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            try:
                cmd = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            found.append((child, cmd.decode(errors="replace").strip()))
            todo.append(child)
    return found


class Client(threading.Thread):
    def __init__(self, base, stop, tally):
        super().__init__(daemon=True)
        self.base, self.stop, self.tally = base, stop, tally
        self.session = requests.Session()

    def upload(self):
        page = self.session.get(self.base + "/upload/", timeout=30)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        return self.session.post(self.base + "/upload/", data={"csrfmiddlewaretoken": token},
                                 files={"file": ("soak.bin", os.urandom(200_000))},
                                 headers={"Referer": self.base + "/upload/"}, timeout=30)

    def run(self):
        while not self.stop.is_set():
            path = random.choice(MIX)
            try:
                answer = (self.upload() if path == "upload"
                          else self.session.get(self.base + path, timeout=30))
                ok = answer.status_code < 500
            except (requests.RequestException, AttributeError):
                ok = False
            self.tally(path, ok)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", 30)))
    args = parser.parse_args()
    var = Path(tempfile.mkdtemp(prefix="strata-soak-"))
    os.chmod(var, 0o755)
    port, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env.update(EXAMPLE_VAR=str(var), EXAMPLE_PG_SERVER_PORT=str(free_port()),
               EXAMPLE_POOLER_PORT=str(free_port()), EXAMPLE_STRATA_BIN=str(STRATA),
               STRATA_CACHE__BIND=f"127.0.0.1:{free_port()}", EXAMPLE_DOWNLOADS=str(var))
    script = subprocess.Popen(["bash", "scripts/run-example.sh", "--bind", f"127.0.0.1:{port}",
                               "--admin", f"127.0.0.1:{admin}", "--workers", "4"],
                              cwd=ROOT, env=env, stdout=open(var / "run.log", "wb"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    counts = {"ok": 0, "failed": 0}
    lock = threading.Lock()

    def tally(path, ok):
        with lock:
            counts["ok" if ok else "failed"] += 1

    samples, kills, reloads = [], 0, 0
    stop = threading.Event()
    try:
        wait_port(admin, 300)
        base = f"http://127.0.0.1:{port}"
        master = next(pid for pid, cmd in descendants(script.pid) if "strata master" in cmd)
        clients = [Client(base, stop, tally) for _ in range(8)]
        for client in clients:
            client.start()
        start = time.monotonic()
        next_sample = next_kill = next_reload = start
        next_kill += 60
        next_reload += 300
        while (now := time.monotonic()) - start < args.minutes * 60:
            if now >= next_sample:
                tree = descendants(master)
                workers = [pid for pid, cmd in tree if "strata worker" in cmd]
                zygotes = [pid for pid, cmd in tree if "strata zygote" in cmd]
                with lock:
                    done = dict(counts)
                samples.append({"t": round(now - start), "master_kb": rss_kb(master),
                                "zygote_kb": sum(rss_kb(p) for p in zygotes),
                                "workers_kb": sum(rss_kb(p) for p in workers),
                                "workers": len(workers), **done})
                next_sample += 10
            if now >= next_kill:
                status = requests.get(f"http://127.0.0.1:{admin}/status", timeout=10).json()
                victims = [w["pid"] for w in status["app"]["workers"] if w["state"] != "retiring"]
                if victims:
                    os.kill(random.choice(victims), signal.SIGKILL)
                    kills += 1
                next_kill += 60
            if now >= next_reload:
                threading.Thread(target=lambda: requests.post(
                    f"http://127.0.0.1:{admin}/reload", timeout=300), daemon=True).start()
                reloads += 1
                next_reload += 300
            time.sleep(0.5)
    finally:
        stop.set()
        os.killpg(script.pid, signal.SIGTERM)
        script.wait(120)
    settled = [s for s in samples if s["t"] >= 300] or samples
    growth = settled[-1]["master_kb"] / settled[0]["master_kb"] - 1
    passed = growth < 0.05 and counts["failed"] <= kills
    report = {"minutes": args.minutes, "samples": samples, "kills": kills, "reloads": reloads,
              "requests": counts, "master_growth_after_5min": growth, "pass": passed}
    stamp = datetime.datetime.now()
    png = ROOT / "benches" / "results" / f"soak-{stamp:%Y%m%d-%H%M}.png"
    plot(samples, png, args.minutes)
    lines = [f"# Soak, {stamp:%Y-%m-%d %H:%M}", "",
             f"{args.minutes:g} minutes of mixed load through every tier of one node "
             f"(example site, 4 workers, 8 client threads); a worker killed every minute "
             f"({kills} kills), a reload every 5 minutes ({reloads}).", "",
             f"- requests: {counts['ok']} answered, {counts['failed']} failed "
             f"(allowed: one per killed worker, {kills})",
             f"- master RSS after the first 5 minutes: {settled[0]['master_kb'] / 1024:.1f} MiB"
             f" → {settled[-1]['master_kb'] / 1024:.1f} MiB ({100 * growth:+.1f} %, limit +5 %)",
             f"- zygote and workers at the end: {samples[-1]['zygote_kb'] / 1024:.1f} MiB and "
             f"{samples[-1]['workers_kb'] / 1024:.1f} MiB ({samples[-1]['workers']} workers)",
             f"- plot: {png.relative_to(ROOT)}", "", f"**{'PASS' if passed else 'FAIL'}**", ""]
    save("soak", lines, report)
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}))


def plot(samples, png, minutes):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    minutes_axis = [s["t"] / 60 for s in samples]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for key, label in [("master_kb", "master"), ("zygote_kb", "zygote"),
                       ("workers_kb", "workers (sum)")]:
        ax.plot(minutes_axis, [s[key] / 1024 for s in samples], label=label)
    ax.axvline(5, color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"Strata soak: {minutes:g} min, a worker killed every minute, reload every 5")
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(exist_ok=True)
    fig.savefig(png, dpi=100)


if __name__ == "__main__":
    main()

"""What the benchmark drivers share: the repository's paths, free ports, waiting for a server,
wrk, and the measuring method of ../shared/BENCHMARKS.md (servers pinned to core 0, wrk to
core 1; every server started up front; each round measures each server once, in rotated
order, after a discarded warm-up; a server's figure is its median over the rounds)."""

import datetime
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.prefix)
# `STRATA_BIN` runs the benchmarks against another build (an older commit's, to compare).
STRATA = Path(os.environ.get("STRATA_BIN", ROOT / "target" / "release" / "strata"))
RESULTS = ROOT / "benches" / "results"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


def wrk(port, path, seconds, connections=32, scheme="http"):
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
                          "--latency", f"{scheme}://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in m.groups())
    return {"rps": rps, "p99_ms": float(p99.group(1)) * scale, "errors": errors}


def measure(servers, path, rounds, seconds, env, scheme="http", each_round=None, check=None):
    """Starts every server (name -> (port, command)), measures them round-robin, stops them;
    returns name -> median req/s, median p99, total errors, each round's figures and, when
    one of them is "strata", Strata's ratio to it round by round. `each_round`, if given, is
    called after every round (to measure a ceiling in the same minute as the servers);
    `check(name, port)`, if given, once each server answers (to see it serves what is meant)."""
    procs = {}
    try:
        for name, (port, command) in servers.items():
            procs[name] = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, start_new_session=True)
        for name, (port, _) in servers.items():
            wait_port(port)
            if check:
                check(name, port)
            wrk(port, path, 3, scheme=scheme)  # discarded warm-up
        results = {name: [] for name in servers}
        names = list(servers)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                results[name].append(wrk(servers[name][0], path, seconds, scheme=scheme))
            if each_round:
                each_round()
    finally:
        stop(procs.values())
    reference = "strata" if "strata" in results else None
    summary = {}
    for name, runs in results.items():
        row = {
            "rps": statistics.median(r["rps"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
            "rounds": runs,
        }
        if reference:
            # Paired by round: a slow minute slows both servers of a round alike, so the
            # median of the rounds' ratios moves less than the ratio of the medians.
            ours = results[reference]
            row["rps_ratio_by_round"] = [a["rps"] / b["rps"] for a, b in zip(ours, runs)]
            row["p99_ratio_by_round"] = [a["p99_ms"] / b["p99_ms"] for a, b in zip(ours, runs)]
        summary[name] = row
    return summary


def table(summary, reference="strata"):
    """Markdown rows: each server with the reference's ratios against it, as the median of the
    rounds' ratios (each round measured both in the same minute)."""
    lines = ["| server | req/s | p99 ms | errors | Strata req/s ratio | Strata p99 ratio |"
             " req/s ratios by round | p99 ratios by round |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in summary.items():
        if name == reference:
            lines.append(f"| {name} | {row['rps']:.0f} | {row['p99_ms']:.2f} | {row['errors']} "
                         "| | | | |")
            continue
        rps, p99 = row["rps_ratio_by_round"], row["p99_ratio_by_round"]
        lines.append(f"| {name} | {row['rps']:.0f} | {row['p99_ms']:.2f} | {row['errors']} | "
                     f"{statistics.median(rps):.2f} | {statistics.median(p99):.2f} | "
                     f"{' '.join(f'{x:.2f}' for x in rps)} | {' '.join(f'{x:.2f}' for x in p99)} |")
    return lines


def stop(procs):
    """Stops servers started with `start_new_session=True`: SIGTERM, then SIGKILL after 15 s."""
    procs = list(procs)
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def save(name, lines, report):
    """Prints the Markdown report and writes it, with its JSON, to benches/results/."""
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = f"{datetime.datetime.now():%Y%m%d-%H%M}"
    (RESULTS / f"{name}-{stamp}.md").write_text(text + "\n")
    (RESULTS / f"{name}-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")

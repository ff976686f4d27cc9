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
import tempfile
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


def at_rate(rate, connections=32):
    """A load for `measure` in place of wrk: `rate` requests/s in all, spread over
    `connections` HTTP/1.1 connections (h2load `--rps`), so every server is measured at the
    same offered load, below what the slowest of them can do, and its latencies are compared
    at equal throughput. p99 is read from h2load's log of every request (its first second, a
    warm-up, left out)."""

    def load(port, path, seconds, scheme="http"):
        with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
            out = subprocess.run(
                ["taskset", "-c", "1", "h2load", "--h1", "-t1", f"-c{connections}",
                 f"--rps={rate / connections:.1f}", "-D", str(seconds + 1),
                 f"--log-file={log.name}", f"{scheme}://127.0.0.1:{port}{path}"],
                capture_output=True, text=True).stdout
            rows = [line.split("\t") for line in log.read().splitlines() if line.strip()]
        start = min(int(r[0]) for r in rows) + 1_000_000
        kept = sorted(int(r[2]) for r in rows if int(r[0]) >= start)
        errors = sum(1 for r in rows if not r[1].startswith("2"))
        if m := re.search(r"(\d+) failed, (\d+) errored, (\d+) timeout", out):
            errors += sum(int(x) for x in m.groups())
        return {"rps": len(kept) / seconds, "p99_ms": kept[int(0.99 * len(kept))] / 1000,
                "p50_ms": kept[len(kept) // 2] / 1000, "errors": errors}

    return load


def measure(servers, path, rounds, seconds, env, scheme="http", each_round=None, check=None,
            load=wrk):
    """Starts every server (name -> (port, command)), measures them round-robin, stops them;
    returns name -> median req/s, median p99, total errors, each round's figures and, when
    one of them is "strata", Strata's ratio to it round by round. `each_round`, if given, is
    called after every round (to measure a ceiling in the same minute as the servers);
    `check(name, port)`, if given, once each server answers (to see it serves what is meant);
    `load` drives each round (wrk by default: as many requests as the server can take)."""
    procs = {}
    try:
        for name, (port, command) in servers.items():
            procs[name] = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, start_new_session=True)
        for name, (port, _) in servers.items():
            wait_port(port)
            if check:
                check(name, port)
            load(port, path, 3, scheme=scheme)  # discarded warm-up
        results = {name: [] for name in servers}
        names = list(servers)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                results[name].append(load(servers[name][0], path, seconds, scheme=scheme))
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

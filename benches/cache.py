"""Cache tier benchmark driver (run through benches/cache.sh).

A 90 % get / 10 % set mix over 10 000 keys, 100-byte and 10-KB values, 50 closed-loop
connections: Strata (`--tiers cache`) and memcached 1.6 (one thread, as the project's notes
found it has the better p99 on two cores), each pinned to core 0; the load generator
(crates/cache/examples/memload.rs) on core 1. Each round measures both, in rotated order;
figures are medians of the rounds.

Then the hit rate when the working set is larger than the store: 12 000 keys of 10 KB
(about 120 MB) through a 64 MiB store on both sides, each get that misses followed by a set
of that key, as a cache's client does; what matters is which items each store keeps. And
libmemcached's memcslap `--test=get` (it sets its keys, then reads them) against a fresh
16 MiB store on each side: the share of its gets that hit, from each server's `stats`.
"""

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess

from benchlib import ROOT, STRATA, free_port, save, stop, wait_port

MEMLOAD = ROOT / "target" / "release" / "examples" / "memload"
SIZES = {"100B": 100, "10KB": 10240}


def load(port, seconds, size, keys=10_000):
    out = subprocess.run(["taskset", "-c", "1", str(MEMLOAD), f"127.0.0.1:{port}", "50",
                          str(seconds), str(size), "90", str(keys)], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)


def start(capacity_mb, env):
    """Strata and memcached with `capacity_mb` of store each, pinned to core 0."""
    ports = {"strata": free_port(), "memcached": free_port()}
    env = dict(env, STRATA_CACHE__BIND=f"127.0.0.1:{ports['strata']}",
               STRATA_CACHE__CAPACITY_BYTES=str(capacity_mb * 1024 * 1024))
    commands = {
        "strata": ["taskset", "-c", "0", str(STRATA), "run", "--tiers", "cache",
                   "--bind", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}"],
        "memcached": ["taskset", "-c", "0", "memcached", "-u", "root", "-t", "1", "-m",
                      str(capacity_mb), "-U", "0", "-l", "127.0.0.1", "-p",
                      str(ports["memcached"])],
    }
    procs = {name: subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
             for name, cmd in commands.items()}
    for port in ports.values():
        wait_port(port)
    return ports, procs


def rounds(ports, count, seconds, size, keys=10_000):
    """Each server's runs: a discarded warm-up, then `count` rounds in rotated order."""
    runs = {name: [] for name in ports}
    for port in ports.values():
        load(port, 3, size, keys)
    names = list(ports)
    for r in range(count):
        for name in names[r % 2:] + names[:r % 2]:
            runs[name].append(load(ports[name], seconds, size, keys))
    return runs


def stats(port):
    """A memcached server's `stats`, as a dict."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"stats\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            data += sock.recv(65536)
    return dict(line.split()[1:3] for line in data.decode().splitlines()
                if line.startswith("STAT "))


def memcslap_hit_rate(ports):
    """memcslap's get test against each server; the share of gets that hit."""
    rates = {}
    for name, port in ports.items():
        subprocess.run(["taskset", "-c", "1", "memcslap", "-s", f"127.0.0.1:{port}",
                        "--test=get"], capture_output=True, check=True)
        st = stats(port)
        hits, misses = int(st["get_hits"]), int(st["get_misses"])
        rates[name] = hits / max(hits + misses, 1)
    return rates


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    report = {}
    lines = [f"# Cache benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}", "",
             f"90 % get / 10 % set, 10 000 keys, 50 connections, {args.seconds}s per run; "
             f"server on core 0, load generator on core 1; median of {args.rounds} rounds.", ""]
    ports, procs = start(512, env)
    try:
        for workload, size in SIZES.items():
            runs = rounds(ports, args.rounds, args.seconds, size)
            summary = {name: {"ops": statistics.median(x["ops"] for x in rs),
                              "p99_ms": statistics.median(x["p99_ms"] for x in rs)}
                       for name, rs in runs.items()}
            report[workload] = summary
            s, m = summary["strata"], summary["memcached"]
            lines += [f"## {workload} values", "",
                      "| server | ops/s | p99 ms |", "|---|---|---|",
                      f"| strata | {s['ops']:.0f} | {s['p99_ms']:.2f} |",
                      f"| memcached | {m['ops']:.0f} | {m['p99_ms']:.2f} |", "",
                      f"Strata / memcached: {s['ops'] / m['ops']:.2f}x ops/s, "
                      f"{s['p99_ms'] / m['p99_ms']:.2f}x p99.", ""]
    finally:
        stop(procs.values())
    ports, procs = start(64, env)
    try:
        runs = rounds(ports, args.rounds, args.seconds, SIZES["10KB"], keys=12_000)
        summary = {name: {"hit_rate": statistics.median(x["hit_rate"] for x in rs),
                          "ops": statistics.median(x["ops"] for x in rs)}
                   for name, rs in runs.items()}
        report["hit_rate"] = summary
        s, m = summary["strata"], summary["memcached"]
        lines += ["## Working set larger than the store", "",
                  "12 000 keys of 10 KB through a 64 MiB store; a miss is followed by a set.", "",
                  "| server | gets that hit | ops/s |", "|---|---|---|",
                  f"| strata | {100 * s['hit_rate']:.1f} % | {s['ops']:.0f} |",
                  f"| memcached | {100 * m['hit_rate']:.1f} % | {m['ops']:.0f} |", "",
                  f"Strata - memcached: {100 * (s['hit_rate'] - m['hit_rate']):+.1f} points.", ""]
    finally:
        stop(procs.values())
    ports, procs = start(16, env)
    try:
        rates = memcslap_hit_rate(ports)
        report["memcslap_get_hit_rate"] = rates
        lines += ["## memcslap --test=get, 16 MiB store", "",
                  "| server | gets that hit |", "|---|---|",
                  f"| strata | {100 * rates['strata']:.1f} % |",
                  f"| memcached | {100 * rates['memcached']:.1f} % |", ""]
    finally:
        stop(procs.values())
    save("cache", lines, report)


if __name__ == "__main__":
    main()

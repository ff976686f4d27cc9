"""User-space instructions per transaction of each pooler, counted by callgrind (run through
benches/dbpool-instructions.sh).

One private PostgreSQL (as in benches/dbpool.py, scale 10); each pooler runs under callgrind,
in transaction mode with a pool of 20, twice: pgbench (10 clients, one thread) runs 100 and
then 600 transactions per client through it. The difference of the two totals over the
5 000 transactions between them is the pooler's own code per transaction, logins, start-up
and shutdown cancelling out. Strata runs its sessions on one thread of its own
(the default `threads = 1`, health checks off); PgBouncer is the apt package. Unlike a timed run this
figure does not move with the machine's load, so a change to the relay can be judged before
a timed run (`benches/dbpool.sh`). It counts instructions in user space only: the kernel's
work for the same sends and receives, most of a pooler's CPU, is not in it.

`bash benches/dbpool-instructions.sh --strata PATH` counts another Strata build instead.
"""

import argparse
import datetime
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from benchlib import STRATA, free_port, save, wait_port
from dbpool import PASSWORD, Postgres, pgbouncer, strata

SMALL, LARGE, CLIENTS = 100, 600, 10
WORKLOADS = {"select-only (-S)": ["-S"], "TPC-B-like": []}


def instructions(out_file):
    """The total callgrind wrote to `out_file` (waiting for it: under runuser, the pooler
    may still be writing it when the command that started it has exited)."""
    for _ in range(120):
        if Path(out_file).exists():
            for line in Path(out_file).read_text().splitlines():
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1])
        time.sleep(0.5)
    raise RuntimeError(f"no totals in {out_file}")


def counted(start, port, pg, args, transactions, out_file):
    """Runs the pooler `start(out_file)` under callgrind, `transactions` per client through
    it, stops it and returns its instruction total."""
    proc = start(out_file)
    try:
        wait_port(port, timeout=120)
        subprocess.run(
            [str(pg.bin / "pgbench"), "-n", "-h", "127.0.0.1", "-p", str(port), "-U",
             "postgres", "-c", str(CLIENTS), "-j", "1", "-t", str(transactions), *args,
             "postgres"], env={**os.environ, "PGPASSWORD": PASSWORD}, check=True,
            capture_output=True)
    finally:
        # PgBouncer runs under runuser when we are root: signal the whole session.
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    return instructions(out_file)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--strata", type=Path, default=STRATA,
                        help="the Strata binary to count (another build, to compare)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="strata-bench-pgi-"))
    root.chmod(0o777)
    pg = Postgres(root)
    port = free_port()
    valgrind = ["valgrind", "--tool=callgrind"]

    def pooler(out_file):
        return strata(root, "strata", port, pg.port,
                      'threads = 1\nhealth_check_interval = "0s"\n',
                      prefix=[*valgrind, f"--callgrind-out-file={out_file}"],
                      binary=args.strata)

    def bouncer(out_file):
        return pgbouncer(root, pg.port, port, pg.as_user,
                         prefix=[*valgrind, f"--callgrind-out-file={out_file}"])

    lines = [f"# Pooler instructions per transaction, {datetime.datetime.now():%Y-%m-%d %H:%M}",
             "", f"callgrind, pgbench -c {CLIENTS} -j 1, ({LARGE} − {SMALL}) transactions per "
             "client; user space only.", "",
             "| workload | Strata (`threads = 1`) | PgBouncer | Strata ÷ PgBouncer |",
             "|---|---|---|---|"]
    report = {}
    try:
        pg.run("pgbench", "-i", "-q", "-s", "10", "-h", str(root), "-p", str(pg.port), "-U",
               "postgres", "postgres")
        for workload, extra in WORKLOADS.items():
            per_tx = {}
            for name, start in (("strata", pooler), ("pgbouncer", bouncer)):
                small = counted(start, port, pg, extra, SMALL, root / f"{name}-small.out")
                large = counted(start, port, pg, extra, LARGE, root / f"{name}-large.out")
                per_tx[name] = (large - small) / ((LARGE - SMALL) * CLIENTS)
            report[workload] = per_tx
            lines.append(f"| {workload} | {per_tx['strata']:,.0f} | {per_tx['pgbouncer']:,.0f} "
                         f"| {per_tx['strata'] / per_tx['pgbouncer']:.2f}× |")
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    save("dbpool-instructions", lines, report)


if __name__ == "__main__":
    main()

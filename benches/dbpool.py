"""PostgreSQL pooler benchmark driver (run through benches/dbpool.sh).

pgbench, 50 clients, 2 threads, against one private PostgreSQL (initdb into a temporary
directory, scale 10): select-only (`-S`) and the default TPC-B-like script, through Strata
(`--tiers dbpool`, transaction pooling, pool of 20), through PgBouncer (apt, transaction
pooling, pool of 20) and straight to PostgreSQL. Nothing is pinned: PostgreSQL, the pooler
and pgbench share both cores, as they would on one small machine, so the pooler's own CPU
cost shows. Each round measures every target once, in rotated order; figures are medians of
the rounds, and the median of the per-round ratios (a slow minute hits both poolers of a
round alike). Beside throughput, each pooler's own CPU time per transaction (from
/proc/<pid>/stat over the run): what it takes from PostgreSQL on a shared machine.
"""

import argparse
import datetime
import os
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from benchlib import STRATA, free_port, save, stop, wait_port

PASSWORD = "bench"
WORKLOADS = {"select-only (-S)": ["-S"], "TPC-B-like": []}


class Postgres:
    def __init__(self, root):
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        self.bin = bins[-1].parent
        self.port = free_port()
        self.root = root
        self.data = root / "data"
        self.data.mkdir()
        self.as_user = []
        if os.geteuid() == 0:
            for path in (root, self.data):
                shutil.chown(path, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        pwfile = root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        pwfile.chmod(0o644)
        self.run("initdb", "-D", str(self.data), "-U", "postgres", "--pwfile", str(pwfile),
                 "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8")
        self.run("pg_ctl", "-D", str(self.data), "-l", str(root / "log"), "-w", "start", "-o",
                 f"-p {self.port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200"
                 " -c shared_buffers=256MB -c synchronous_commit=off")

    def run(self, tool, *args):
        subprocess.run([*self.as_user, str(self.bin / tool), *args], check=True,
                       stdout=subprocess.DEVNULL)

    def stop(self):
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m",
                        "fast", "-w", "stop"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def pgbouncer(root, pg_port, port, as_user):
    """Starts PgBouncer 1.x in transaction mode with a pool of 20, like Strata's."""
    (root / "users.txt").write_text(f'"postgres" "{PASSWORD}"\n')
    ini = root / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"postgres = host=127.0.0.1 port={pg_port} dbname=postgres\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = scram-sha-256\nauth_file = {root / 'users.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 20\nmax_client_conn = 200\n"
        f"logfile = {root / 'pgbouncer.log'}\n")
    for path in (ini, root / "users.txt"):
        if as_user:
            shutil.chown(path, "postgres", "postgres")
    return subprocess.Popen([*as_user, "pgbouncer", str(ini)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def cpu_seconds(pid):
    """User + system CPU time of process `pid` and its children's threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pid(proc):
    """The pooler's own process: PgBouncer runs under runuser when we are root."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return int(children[0]) if children else proc.pid


def pgbench(pg, port, args, seconds, pid=None):
    """One timed run. pgbench vacuums its small tables first (no `-n`), so every run starts
    from the same state: TPC-B's updates otherwise bloat them and slow each later run."""
    before = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(
        [str(pg.bin / "pgbench"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
         "-c", "50", "-j", "2", "-T", str(seconds), *args, "postgres"],
        env={**os.environ, "PGPASSWORD": PASSWORD}, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stdout + out.stderr)
    tps = float(re.search(r"tps = ([\d.]+) \(without", out.stdout).group(1))
    latency = float(re.search(r"latency average = ([\d.]+) ms", out.stdout).group(1))
    done = int(re.search(r"actually processed: (\d+)", out.stdout).group(1))
    cpu_us = (cpu_seconds(pid) - before) * 1e6 / max(done, 1) if pid else None
    return tps, latency, cpu_us


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--scale", type=int, default=10)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="strata-bench-pg-"))
    root.chmod(0o755)
    pg = Postgres(root)
    ports = {"strata": free_port(), "strata-1-thread": free_port(), "pgbouncer": free_port(),
             "direct": pg.port}
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    def strata(name, extra=""):
        config = root / f"{name}.toml"
        config.write_text(
            'tiers = ["dbpool"]\n[dbpool]\n'
            f'bind = "127.0.0.1:{ports[name]}"\nserver = "127.0.0.1:{pg.port}"\n'
            f'server_password = "{PASSWORD}"\npool_size = 20\n{extra}'
            f'[admin]\nbind = "127.0.0.1:{free_port()}"\n')
        return subprocess.Popen([str(STRATA), "run", "--config", str(config)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)

    procs = {
        # The node's shared runtime, and one thread of the pooler's own (dbpool.threads).
        "strata": strata("strata"),
        "strata-1-thread": strata("strata-1-thread", "threads = 1\n"),
        "pgbouncer": pgbouncer(root, pg.port, ports["pgbouncer"], pg.as_user),
    }
    lines = [f"# PostgreSQL pooler benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}", "",
             f"pgbench -c 50 -j 2 -T {args.seconds}, scale {args.scale}; Strata and PgBouncer "
             "in transaction mode with a pool of 20; nothing pinned; median of "
             f"{args.rounds} rounds.", ""]
    report = {}
    try:
        for port in ports.values():
            wait_port(port)
        pg.run("pgbench", "-i", "-q", "-s", str(args.scale), "-h", str(root), "-p",
               str(pg.port), "-U", "postgres", "postgres")
        pids = {"strata": procs["strata"].pid, "strata-1-thread": procs["strata-1-thread"].pid,
                "pgbouncer": server_pid(procs["pgbouncer"])}
        for workload, extra in WORKLOADS.items():
            runs = {name: [] for name in ports}
            for port in ports.values():
                pgbench(pg, port, extra, 3)  # discarded warm-up
            names = list(ports)
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    runs[name].append(pgbench(pg, ports[name], extra, args.seconds,
                                              pids.get(name)))
            median = {name: tuple(statistics.median(run[i] for run in results)
                                  if results[0][i] is not None else None for i in range(3))
                      for name, results in runs.items()}
            paired = {name: [s[0] / b[0] for s, b in zip(runs[name], runs["pgbouncer"])]
                      for name in ("strata", "strata-1-thread")}
            report[workload] = {"median": median, "over_pgbouncer_by_round": paired}
            s_tps, s_lat, _ = median["strata"]
            lines += [f"## {workload}", "",
                      "| target | tps | avg latency (ms) | pooler CPU per transaction | "
                      "tps vs Strata | latency vs Strata |",
                      "|---|---|---|---|---|---|"]
            for name, (tps, lat, cpu) in median.items():
                cpu_text = f"{cpu:.0f} µs" if cpu is not None else "—"
                lines.append(f"| {name} | {tps:,.0f} | {lat:.2f} | {cpu_text} | "
                             f"{s_tps / tps:.2f}× | {s_lat / lat:.2f}× |")
            lines.append("")
            for name, ratios in paired.items():
                lines.append(f"{name} ÷ PgBouncer tps, round by round: "
                             + ", ".join(f"{x:.2f}" for x in ratios)
                             + f" (median {statistics.median(ratios):.2f})  ")
            lines.append("")
    finally:
        stop(procs.values())
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    lines.append("Ratios are Strata's figure over the other's: tps above 1 and latency below 1 "
                 "favour Strata.")
    save("dbpool", lines, report)


if __name__ == "__main__":
    main()

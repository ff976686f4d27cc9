"""PostgreSQL pooler benchmark driver (run through benches/dbpool.sh).

pgbench, 50 clients, 2 threads, against one private PostgreSQL (initdb into a temporary
directory, scale 10): select-only (`-S`) and the default TPC-B-like script, through Strata
(`--tiers dbpool`, transaction pooling, pool of 20), through PgBouncer (apt, transaction
pooling, pool of 20) and straight to PostgreSQL. Nothing is pinned: PostgreSQL, the pooler
and pgbench share both cores, as they would on one small machine, so the pooler's own CPU
cost shows. Each round measures every target once, in rotated order; figures are medians of
the rounds.
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


def pgbench(pg, port, args, seconds):
    out = subprocess.run(
        [str(pg.bin / "pgbench"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
         "-c", "50", "-j", "2", "-T", str(seconds), "-n", *args, "postgres"],
        env={**os.environ, "PGPASSWORD": PASSWORD}, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stdout + out.stderr)
    tps = float(re.search(r"tps = ([\d.]+) \(without", out.stdout).group(1))
    latency = float(re.search(r"latency average = ([\d.]+) ms", out.stdout).group(1))
    return tps, latency


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--scale", type=int, default=10)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="strata-bench-pg-"))
    root.chmod(0o755)
    pg = Postgres(root)
    ports = {"strata": free_port(), "pgbouncer": free_port(), "direct": pg.port}
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    config = root / "strata.toml"
    config.write_text(
        'tiers = ["dbpool"]\n[dbpool]\n'
        f'bind = "127.0.0.1:{ports["strata"]}"\nserver = "127.0.0.1:{pg.port}"\n'
        f'server_password = "{PASSWORD}"\npool_size = 20\n'
        f'[admin]\nbind = "127.0.0.1:{free_port()}"\n')
    procs = {
        "strata": subprocess.Popen([str(STRATA), "run", "--config", str(config)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True),
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
        for workload, extra in WORKLOADS.items():
            runs = {name: [] for name in ports}
            for port in ports.values():
                pgbench(pg, port, extra, 3)  # discarded warm-up
            names = list(ports)
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    runs[name].append(pgbench(pg, ports[name], extra, args.seconds))
            median = {name: (statistics.median(t for t, _ in results),
                             statistics.median(l for _, l in results))
                      for name, results in runs.items()}
            report[workload] = median
            s_tps, s_lat = median["strata"]
            lines += [f"## {workload}", "",
                      "| target | tps | avg latency (ms) | tps vs Strata | latency vs Strata |",
                      "|---|---|---|---|---|"]
            for name, (tps, lat) in median.items():
                lines.append(f"| {name} | {tps:,.0f} | {lat:.2f} | "
                             f"{s_tps / tps:.2f}× | {s_lat / lat:.2f}× |")
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

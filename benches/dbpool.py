"""PostgreSQL pooler benchmark driver (run through benches/dbpool.sh).

pgbench, 50 clients, 2 threads, against one private PostgreSQL (initdb into a temporary
directory, scale 10): select-only (`-S`) and the default TPC-B-like script, through Strata
(`--tiers dbpool`, transaction pooling, pool of 20; sessions on one thread of the pooler's own,
the default, and on the node's shared runtime), through PgBouncer (apt, transaction
pooling, pool of 20), straight to PostgreSQL, and through the floor: a bare relay
(crates/dbpool/examples/relay.rs) that gives each client its own server connection and only
copies bytes. Nothing is pinned: PostgreSQL, the pooler and pgbench share both cores, as
they would on one small machine, so the pooler's own CPU cost shows. Every run starts from
the same state: pgbench vacuums all four tables first (`-v`), and autovacuum and timed
checkpoints are off, so no background work lands in one run. Each round measures every
target once, in rotated order; figures are medians of the rounds, and the median of the
per-round ratios (a slow minute hits both poolers of a round alike).

Beside throughput, CPU time per transaction: the pooler's own, PostgreSQL's (the postmaster
and every backend), pgbench's, and the machine's. The machine is saturated, so throughput
follows total CPU per transaction; the floor relay's CPU is the least a pooler's data path
can cost, which bounds what any pooler can gain over another on this machine.
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
                 " -c shared_buffers=256MB -c synchronous_commit=off -c autovacuum=off"
                 " -c checkpoint_timeout=1h -c max_wal_size=8GB")
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def run(self, tool, *args):
        subprocess.run([*self.as_user, str(self.bin / tool), *args], check=True,
                       stdout=subprocess.DEVNULL)

    def stop(self):
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m",
                        "fast", "-w", "stop"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def strata(root, name, port, pg_port, extra="", prefix=(), binary=STRATA):
    """Starts Strata's pooler alone (transaction mode, a pool of 20, `extra` settings) on
    `port`, under `prefix` (a command such as valgrind), if given."""
    config = root / f"{name}.toml"
    config.write_text(
        'tiers = ["dbpool"]\n[dbpool]\n'
        f'bind = "127.0.0.1:{port}"\nserver = "127.0.0.1:{pg_port}"\n'
        f'server_password = "{PASSWORD}"\npool_size = 20\n{extra}'
        f'[admin]\nbind = "127.0.0.1:{free_port()}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    return subprocess.Popen([*prefix, str(binary), "run", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def pgbouncer(root, pg_port, port, as_user, prefix=()):
    """Starts PgBouncer 1.x in transaction mode with a pool of 20, like Strata's (under
    `prefix`, a command such as valgrind, if given)."""
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
    return subprocess.Popen([*as_user, *prefix, "pgbouncer", str(ini)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


TICK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid):
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid, reaped=False):
    """User + system CPU time of process `pid` (all its threads), and with `reaped` that of
    its children that have exited."""
    f = stat_fields(pid)
    ticks = int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if reaped else 0)
    return ticks / TICK


def postgres_seconds(postmaster):
    """CPU time of PostgreSQL: the postmaster, its live children and those it reaped."""
    total = cpu_seconds(postmaster, reaped=True)
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    for child in children:
        try:
            total += cpu_seconds(int(child))
        except (FileNotFoundError, ProcessLookupError):
            pass  # exited since the list was read: counted as reaped next time
    return total


def machine_seconds():
    """Busy CPU time of the whole machine (all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / TICK


def server_pid(proc):
    """The pooler's own process: PgBouncer runs under runuser when we are root."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return int(children[0]) if children else proc.pid


def pgbench(pg, port, args, seconds, pid=None):
    """One timed run, after pgbench vacuums all four tables (`-v`): every run starts from
    the same state, where TPC-B's updates would otherwise bloat them and slow each later run.
    Returns tps, average latency (ms) and CPU µs per transaction: the pooler's (when `pid`
    is given), PostgreSQL's, pgbench's and the machine's, over the timed part only (from
    pgbench's first progress report to its last)."""
    proc = subprocess.Popen(
        [str(pg.bin / "pgbench"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
         "-c", "50", "-j", "2", "-T", str(seconds), "-v", "-P", "1", *args, "postgres"],
        env={**os.environ, "PGPASSWORD": PASSWORD}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)

    def sample():
        return (cpu_seconds(pid) if pid else 0.0, postgres_seconds(pg.pid),
                cpu_seconds(proc.pid), machine_seconds())

    output, first, last, counted = [], None, None, 0.0
    for line in proc.stdout:
        output.append(line)
        if m := re.match(r"progress: ([\d.]+) s, ([\d.]+) tps", line):
            at = float(m.group(1))
            if first is None:
                first = (sample(), at)
            elif at <= seconds - 1:
                counted += float(m.group(2))
                last = (sample(), at)
    proc.wait()
    out = "".join(output)
    if proc.returncode != 0 or first is None or last is None:
        raise RuntimeError(out)
    tps = float(re.search(r"tps = ([\d.]+) \(without", out).group(1))
    latency = float(re.search(r"latency average = ([\d.]+) ms", out).group(1))
    # Progress lines report each second's rate: their sum is the transactions in between.
    pooler, postgres, bench, machine = [(b - a) * 1e6 / max(counted, 1)
                                        for a, b in zip(first[0], last[0])]
    return tps, latency, pooler if pid else None, postgres, bench, machine


RELAY = STRATA.parent / "examples" / "relay"
COLUMNS = ("tps", "latency", "pooler", "postgres", "pgbench", "machine")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--scale", type=int, default=10)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="strata-bench-pg-"))
    root.chmod(0o755)
    pg = Postgres(root)
    ports = {"strata": free_port(), "strata-shared-runtime": free_port(),
             "pgbouncer": free_port(), "direct": pg.port, "floor-relay": free_port()}

    procs = {
        # One thread of the pooler's own (the default), and the node's shared runtime.
        "strata": strata(root, "strata", ports["strata"], pg.port),
        "strata-shared-runtime": strata(root, "strata-shared-runtime",
                                        ports["strata-shared-runtime"], pg.port, "threads = 0\n"),
        "pgbouncer": pgbouncer(root, pg.port, ports["pgbouncer"], pg.as_user),
        "floor-relay": subprocess.Popen(
            [str(RELAY), f"127.0.0.1:{ports['floor-relay']}", f"127.0.0.1:{pg.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True),
    }
    lines = [f"# PostgreSQL pooler benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}", "",
             f"pgbench -c 50 -j 2 -T {args.seconds} -v, scale {args.scale}; Strata and "
             "PgBouncer in transaction mode with a pool of 20; the floor relay gives each "
             f"client its own server connection; nothing pinned; median of {args.rounds} "
             "rounds. CPU is µs per transaction.", ""]
    report = {}
    try:
        for port in ports.values():
            wait_port(port)
        pg.run("pgbench", "-i", "-q", "-s", str(args.scale), "-h", str(root), "-p",
               str(pg.port), "-U", "postgres", "postgres")
        pids = {"strata": procs["strata"].pid,
                "strata-shared-runtime": procs["strata-shared-runtime"].pid,
                "pgbouncer": server_pid(procs["pgbouncer"]),
                "floor-relay": procs["floor-relay"].pid}
        for workload, extra in WORKLOADS.items():
            runs = {name: [] for name in ports}
            for port in ports.values():
                pgbench(pg, port, extra, 3)  # discarded warm-up
            names = list(ports)
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    runs[name].append(pgbench(pg, ports[name], extra, args.seconds,
                                              pids.get(name)))
            median = {name: [statistics.median(run[i] for run in results)
                             if results[0][i] is not None else None
                             for i in range(len(COLUMNS))]
                      for name, results in runs.items()}
            paired = {name: [s[0] / b[0] for s, b in zip(runs[name], runs["pgbouncer"])]
                      for name in ("strata", "strata-shared-runtime")}
            # What a pooler whose own CPU were the floor's would save over PgBouncer, as a
            # share of the machine's CPU per transaction: the most any pooler can gain here.
            bound = [(b[2] - f[2]) / b[5] for b, f in zip(runs["pgbouncer"], runs["floor-relay"])]
            report[workload] = {"median": dict(zip(ports, median.values())),
                                "over_pgbouncer_by_round": paired,
                                "floor_bound_by_round": bound}
            s_tps, s_lat = median["strata"][:2]
            lines += [f"## {workload}", "",
                      "| target | tps | avg latency (ms) | pooler CPU | PostgreSQL CPU | "
                      "pgbench CPU | machine CPU | tps vs Strata | latency vs Strata |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for name, (tps, lat, *cpu) in median.items():
                cpu_text = " | ".join(f"{c:.0f}" if c is not None else "—" for c in cpu)
                lines.append(f"| {name} | {tps:,.0f} | {lat:.2f} | {cpu_text} | "
                             f"{s_tps / tps:.2f}× | {s_lat / lat:.2f}× |")
            lines.append("")
            for name, ratios in paired.items():
                lines.append(f"{name} ÷ PgBouncer tps, round by round: "
                             + ", ".join(f"{x:.2f}" for x in ratios)
                             + f" (median {statistics.median(ratios):.2f})  ")
            lines.append("PgBouncer's CPU above the floor relay's, as a share of the machine's "
                         f"CPU per transaction (the most any pooler could gain over it here): "
                         f"median {100 * statistics.median(bound):.1f} %")
            lines.append("")
    finally:
        stop(procs.values())
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    lines.append("Ratios are Strata's figure over the other's: tps above 1 and latency below 1 "
                 "favour Strata. The floor relay's tps is not a pooler's (it opens a server "
                 "connection per client); its pooler CPU is the floor.")
    save("dbpool", lines, report)


if __name__ == "__main__":
    main()

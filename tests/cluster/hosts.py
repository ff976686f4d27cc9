"""Several hosts on one machine: network namespaces joined by veth pairs to a bridge.

`Cluster` makes a bridge with a /24 of its own (the test process, in the root namespace, is
`.1` on it) and `Cluster.host(name)` a namespace with its own address on that subnet, its own
loopback and its own ports, so every host runs `strata` on the same ports as a real node
would. A host can be killed (every process in it, at once), cut off (every packet in or out
dropped, as a partitioned or dead-silent host behaves: an nftables rule inside the
namespace, since this machine's kernel has no `sch_netem` for `tc netem loss 100%`), and
brought back. Everything is removed when the cluster closes,
even after a failed test.

Needs root (CI has it), iproute2, nftables and dnsmasq.
"""

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from conftest import strata_run, wait_until

HTTP_PORT = 8000
# Every host's admin listener is on its network address, so it needs a token.
ADMIN_TOKEN = "cluster-test-token"
ADMIN_PORT = 9000
CACHE_PORT = 11211


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


def missing():
    """Why cluster tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "cluster tests make network namespaces, which needs root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"cluster tests need `{tool}` (iproute2, nftables)"
    return None


def connectable(addr, port):
    try:
        with socket.create_connection((addr, port), timeout=0.3):
            return True
    except OSError:
        return False


def reachable(addr, port, timeout, process=None):
    """Whether `addr:port` accepts connections within `timeout` (False at once if `process`
    exits first)."""
    exited = lambda: process is not None and process.poll() is not None  # noqa: E731
    wait_until(lambda: exited() or connectable(addr, port), timeout)
    return not exited() and connectable(addr, port)


class Host:
    """One namespace: an address on the cluster's subnet and the processes run in it."""

    def __init__(self, cluster, name, index):
        self.cluster = cluster
        self.name = name
        self.ns = f"{cluster.tag}-{name}"
        self.addr = f"{cluster.prefix}.{index}"
        self.outside = f"{cluster.tag}v{index}"
        self.inside = "eth0"
        self.processes = []
        self.strata_args = None
        sh("ip", "netns", "add", self.ns)
        # `ip netns exec` puts this over /etc/resolv.conf: the cluster's DNS server, if any.
        self.etc = Path("/etc/netns") / self.ns
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.etc / "resolv.conf").write_text(f"nameserver {cluster.prefix}.250\n"
                                              "options timeout:1 attempts:2\n")
        sh("ip", "link", "add", self.outside, "type", "veth", "peer", "name", self.inside,
           "netns", self.ns)
        sh("ip", "link", "set", self.outside, "master", cluster.bridge, "up")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.addr}/24", "dev", self.inside)
        sh("ip", "-n", self.ns, "link", "set", self.inside, "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.ns, "route", "add", "default", "via", cluster.gateway)

    def popen(self, args, log=None, env=None, cwd=None):
        """Starts `args` inside this host; its output goes to `log` (a path)."""
        out = open(log, "ab") if log else subprocess.DEVNULL
        process = subprocess.Popen(["ip", "netns", "exec", self.ns, *args], stdout=out,
                                   stderr=subprocess.STDOUT, env=env, cwd=cwd)
        self.processes.append(process)
        return process

    def url(self, path="/", port=HTTP_PORT):
        return f"http://{self.addr}:{port}{path}"

    def start_strata(self, *args, config=None, env=None, wait=True):
        """Runs `strata run` on this host (HTTP on :8000, admin on :9000, the cache on
        :11211, each on the host's address), with `config` (TOML text) if given."""
        tmp = self.cluster.tmp
        command, full_env = strata_run(
            f"{self.addr}:{HTTP_PORT}", f"{self.addr}:{ADMIN_PORT}", f"{self.addr}:{CACHE_PORT}",
            args, config=config, config_path=tmp / f"{self.name}.toml",
            env={"STRATA_ADMIN__TOKEN": ADMIN_TOKEN, **(env or {})})
        self.strata_args = (args, config, env)
        process = self.popen(command, log=self.log_path(), env=full_env, cwd=tmp)
        if wait and not reachable(self.addr, ADMIN_PORT, 60, process):
            raise AssertionError(f"strata on {self.name} did not start:\n{self.log()}")
        return process

    def log_path(self):
        return self.cluster.tmp / f"{self.name}.log"

    def log(self):
        path = self.log_path()
        return path.read_text(errors="replace") if path.exists() else ""

    def admin(self, path):
        import requests
        return requests.get(self.url(path, ADMIN_PORT), timeout=5,
                            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    def pids(self):
        out = sh("ip", "netns", "pids", self.ns, check=False).stdout
        return [int(pid) for pid in out.split()]

    def kill(self):
        """Every process of the host dies at once, as when the machine loses power."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.processes:
            process.wait()
        wait_until(lambda: not self.pids(), 10)
        self.processes = []

    def stop_strata(self, timeout=60):
        """SIGTERM to this host's strata, as a deploy or `systemctl stop` sends; waits for it."""
        process = self.processes[-1]
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=timeout)
        self.processes.remove(process)

    def upgrade_strata(self, timeout=60):
        """A binary upgrade: a new strata takes this host's listening sockets over
        (`--upgrade`) and the old one drains and exits; waits for that."""
        old = self.processes[-1]
        args, config, env = self.strata_args
        self.start_strata(*args, "--upgrade", config=config, env=env, wait=False)
        self.strata_args = (args, config, env)
        old.wait(timeout=timeout)
        self.processes.remove(old)

    def restart_strata(self):
        args, config, env = self.strata_args
        return self.start_strata(*args, config=config, env=env)

    def cut(self):
        """Drops every packet into or out of the host (its loopback keeps working)."""
        rules = (
            "table inet strata_cut {\n"
            "  chain input { type filter hook input priority -10; policy drop;"
            " iifname \"lo\" accept; }\n"
            "  chain output { type filter hook output priority -10; policy drop;"
            " oifname \"lo\" accept; }\n"
            "}\n"
        )
        subprocess.run(["ip", "netns", "exec", self.ns, "nft", "-f", "-"], input=rules,
                       text=True, check=True, capture_output=True)

    def heal(self):
        sh("ip", "netns", "exec", self.ns, "nft", "delete", "table", "inet", "strata_cut",
           check=False)

    def close(self):
        self.kill()
        sh("ip", "netns", "del", self.ns, check=False)
        sh("ip", "link", "del", self.outside, check=False)
        shutil.rmtree(self.etc, ignore_errors=True)


class Dns:
    """dnsmasq answering from a hosts file the test rewrites (re-read on SIGHUP)."""

    def __init__(self, cluster):
        self.host = cluster.host("dns", index=250)
        self.records = cluster.tmp / "dns-hosts"
        self.records.write_text("")
        self.process = self.host.popen(
            ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
             f"--addn-hosts={self.records}", f"--listen-address={self.host.addr}",
             "--bind-interfaces", "--local-ttl=0", "--log-queries", "--user=root",
             f"--pid-file={cluster.tmp / 'dnsmasq.pid'}"],
            log=cluster.tmp / "dns.log")
        listening = lambda: f"{self.host.addr}:53" in sh(  # noqa: E731
            "ip", "netns", "exec", self.host.ns, "ss", "-uln", check=False).stdout
        if not wait_until(lambda: self.process.poll() is not None or listening(), 10) \
                or not listening():
            raise AssertionError(f"dnsmasq did not start: {(cluster.tmp / 'dns.log').read_text()}")

    def set(self, name, hosts):
        """`name` resolves to the addresses of `hosts` from now on."""
        self.records.write_text("".join(f"{h.addr} {name}\n" for h in hosts))
        self.process.send_signal(signal.SIGHUP)


class Cluster:
    """A bridge, a /24 and the hosts on it."""

    def __init__(self, tmp):
        self.tmp = Path(tmp)
        tag = os.getpid() % 100000
        self.tag = f"st{tag}"
        self.bridge = f"{self.tag}br"
        self.prefix = f"10.{200 + tag % 50}.{tag % 250 + 1}"
        self.gateway = f"{self.prefix}.1"
        self.hosts = {}
        self.close_stale()
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")

    def close_stale(self):
        """Removes what an earlier run with the same tag left (a killed pytest)."""
        for ns in sh("ip", "netns", "list", check=False).stdout.split("\n"):
            name = ns.split(" ")[0]
            if name.startswith(f"{self.tag}-"):
                for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                sh("ip", "netns", "del", name, check=False)
        sh("ip", "link", "del", self.bridge, check=False)

    def host(self, name, index=None):
        host = Host(self, name, index or len(self.hosts) + 2)
        self.hosts[name] = host
        return host

    def dns(self):
        """A DNS server (dnsmasq) for the cluster at `.250`, the one every host's resolver
        asks; `Dns.set(name, hosts)` changes what a name resolves to."""
        return Dns(self)

    def close(self):
        for host in self.hosts.values():
            host.close()
        sh("ip", "link", "del", self.bridge, check=False)

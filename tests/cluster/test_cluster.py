"""The cluster, each host its own network namespace with its own address (`hosts.py`): an
edge host running only the balancer in front of app hosts killed, cut off, failing their
checks together, added and removed by DNS, reloaded and restarted under load; purges made on
one app host reaching all; a cache tier of two hosts; a pooler host in front of a PostgreSQL
that restarts. Each test prints the figures it measures for `docs/cluster.md`."""

import collections
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import APPS, EXAMPLE, PG_PASSWORD, VENV, Postgres, wait_until
from hosts import Cluster, missing

# The edge's pool: checks every 250 ms (a check waits 250 ms at most), two in a row to go
# down or up; a connection that cannot be made in 300 ms is retried on another host.
HEALTH_INTERVAL = 0.25
HEALTH_TIMEOUT = 0.25
FALL = 2
TIMEOUT = 1.0
CONNECT_TIMEOUT = 0.3
# Longest an app host that stopped answering keeps getting new requests: `fall` checks that
# each wait their timeout, after up to one interval.
DETECTION = HEALTH_INTERVAL + FALL * (HEALTH_INTERVAL + HEALTH_TIMEOUT)


@pytest.fixture
def cluster(tmp_path, request):
    why = missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    made = Cluster(tmp_path)
    yield made
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for host in made.hosts.values():
            print(f"--- log of {host.name} ---\n{host.log()}")
    made.close()


def app_host(cluster, name, tiers="lb,app", config=None, env=None, app="node"):
    host = cluster.host(name)
    host.start_strata("--app", app, "--chdir", str(APPS), "--virtualenv", str(VENV),
                      "--tiers", tiers, "--workers", "2", config=config,
                      env={"NODE_NAME": name, **(env or {})})
    return host


def edge_host(cluster, apps, url=None, **settings):
    pool = {"health_path": '"/"', "health_interval": f'"{int(HEALTH_INTERVAL * 1000)}ms"',
            "health_timeout": f'"{int(HEALTH_TIMEOUT * 1000)}ms"', "rise": 2, "fall": FALL,
            "timeout": f'"{int(TIMEOUT * 1000)}ms"',
            "connect_timeout": f'"{int(CONNECT_TIMEOUT * 1000)}ms"', "retries": 1,
            "slow_start": '"2s"', "eject_after": 2, **settings}
    lines = ["[lb]", 'default_backend = "app"', "[[lb.backends]]", 'name = "app"']
    lines += [f"{k} = {v}" for k, v in pool.items()]
    if url is not None:
        lines += ["[[lb.backends.servers]]", 'name = "app"', f'url = "{url}"']
    for app in apps:
        lines += ["[[lb.backends.servers]]", f'name = "{app.name}"', f'url = "{app.url("")}"']
    edge = cluster.host("edge")
    edge.start_strata("--tiers", "lb", config="\n".join(lines) + "\n")
    return edge


def servers(edge):
    return {s["name"]: s for s in edge.admin("/status").json()["lb"]["backends"][0]["servers"]}


class Load:
    """Clients in the test's own namespace sending requests to the edge until stopped:
    each result is (sent, finished, status or error, body)."""

    def __init__(self, url, clients=6, headers=None):
        self.url = url
        self.headers = headers
        self.results = []
        # When each client thread sent the request it is waiting for.
        self.pending = {}
        self.running = True
        self.threads = [threading.Thread(target=self.run) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def run(self):
        session = requests.Session()
        me = threading.get_ident()
        while self.running:
            sent = self.pending[me] = time.monotonic()
            try:
                response = session.get(self.url, timeout=30, headers=self.headers)
                outcome, body = response.status_code, response.text
            except requests.RequestException as error:
                outcome, body = type(error).__name__, ""
            self.results.append((sent, time.monotonic(), outcome, body))
        self.pending.pop(me, None)

    def settled(self, moment, after=0):
        """Every request sent before `moment` has its result, and at least `after` were sent
        since: what happened to requests around an event is all known."""
        waiting = all(sent > moment for sent in list(self.pending.values()))
        return waiting and sum(1 for r in self.results if r[0] > moment) >= after

    def since(self, moment):
        return [r for r in self.results if r[1] >= moment]

    def served_by(self, name, after):
        return sum(1 for sent, _, status, body in self.results
                   if sent >= after and status == 200 and body == name)

    def stop(self):
        self.running = False
        for thread in self.threads:
            thread.join()


def failures(results):
    return [r for r in results if r[2] != 200]


def test_an_app_host_killed_or_cut_off_costs_at_most_its_requests_in_flight(cluster):
    apps = [app_host(cluster, f"app{i}") for i in (1, 2, 3)]
    edge = edge_host(cluster, apps)
    load = Load(edge.url("/?sleep=0.05"))
    try:
        assert wait_until(lambda: all(load.served_by(a.name, 0) > 5 for a in apps), 20), \
            collections.Counter(r[3] for r in load.results)

        # Killed: every process of app2 dies at once. What was in flight on it may be lost
        # (the edge logs each request it gives up on; a GET whose connection closed before
        # any answer is sent again, as nginx does); a request sent afterwards is refused and
        # retried on another host.
        origin = f"origin={apps[1].addr}:8000"
        lost = lambda: sum(1 for line in edge.log().splitlines()
                           if "upstream request failed" in line and origin in line)
        before = lost()
        killed = time.monotonic()
        apps[1].kill()
        assert wait_until(lambda: not servers(edge)["app2"]["up"], 10)
        detected = time.monotonic() - killed
        # Every request sent before it was found down has its answer.
        assert wait_until(lambda: load.settled(killed + detected), 10)
        failed = failures(load.since(killed))
        in_flight = lost() - before
        print(f"\nkilled app host: {len(failed)} failed requests ({in_flight} were in flight"
              f" on it), detected down after {detected:.2f} s (bound {DETECTION:.2f} s)")
        assert len(failed) <= in_flight, failed
        assert detected <= DETECTION + 0.5

        # Back: it takes traffic again, starting slowly.
        back = time.monotonic()
        apps[1].restart_strata()
        assert wait_until(lambda: servers(edge)["app2"]["up"], 20)
        ramp = servers(edge)["app2"]["weight_now"]
        assert wait_until(lambda: load.served_by("app2", back) > 5, 20)
        print(f"app host back: up {time.monotonic() - back:.2f} s after its restart,"
              f" weight {ramp:.2f} of 1 at first")
        assert ramp < 1.0

        # Cut off: its packets are dropped; nothing refuses, everything waits. What is in
        # flight on it then, and what the edge still sends it until it finds it down, stays
        # in flight until `timeout`: that many requests is what the cut may cost.
        seen = servers(edge)["app3"]
        cut = time.monotonic()
        apps[2].cut()
        assert wait_until(lambda: not servers(edge)["app3"]["up"], 10)
        detected = time.monotonic() - cut
        # The requests stuck on it end with `timeout`.
        assert wait_until(lambda: load.settled(cut + detected), TIMEOUT + 10)
        in_flight = seen["in_flight"] + servers(edge)["app3"]["requests"] - seen["requests"]
        after_cut = load.since(cut)
        failed = failures(after_cut)
        longest = max(done - sent for sent, done, _, _ in after_cut)
        print(f"cut-off app host: {len(failed)} failed requests ({in_flight} were in flight"
              f" on it or sent to it before it was found down), detected down after {detected:.2f} s, longest request"
              f" {longest:.2f} s (timeout {TIMEOUT} s + connect {CONNECT_TIMEOUT} s)")
        assert detected <= DETECTION + 0.5
        assert longest <= TIMEOUT + CONNECT_TIMEOUT + 0.5
        assert len(failed) <= in_flight, collections.Counter(r[2] for r in failed)

        apps[2].heal()
        healed = time.monotonic()
        assert wait_until(lambda: load.served_by("app3", healed) > 5, 20)
    finally:
        load.stop()
    assert failures(load.results) == failures(load.since(0)), "bookkeeping"


def test_app_hosts_join_and_leave_by_dns_without_a_reload(cluster):
    dns = cluster.dns()
    app1, app2 = app_host(cluster, "app1"), app_host(cluster, "app2")
    dns.set("app.cluster.test", [app1])
    interval = 0.5
    edge = edge_host(cluster, [], url="http://app.cluster.test:8000",
                     resolve_interval=f'"{int(interval * 1000)}ms"')
    assert list(servers(edge)) == [f"app/{app1.addr}:8000"]
    load = Load(edge.url("/?sleep=0.02"), clients=4)
    try:
        assert wait_until(lambda: load.served_by("app1", 0) > 5, 20)

        # A new host appears in DNS: it gets traffic within two resolve intervals.
        added = time.monotonic()
        dns.set("app.cluster.test", [app1, app2])
        assert wait_until(lambda: load.served_by("app2", added) > 0, 10)
        joined = time.monotonic() - added
        # It joined in slow start.
        assert servers(edge)[f"app/{app2.addr}:8000"]["weight_now"] < 1
        assert wait_until(lambda: load.served_by("app2", added) > 5, 10)
        print(f"\nhost added by DNS: first request after {joined:.2f} s"
              f" (resolve interval {interval} s)")
        assert joined <= 2 * interval + 0.5

        # The first one leaves DNS: it gets no new requests; none fails.
        removed = time.monotonic()
        dns.set("app.cluster.test", [app2])
        assert wait_until(lambda: list(servers(edge)) == [f"app/{app2.addr}:8000"], 10)
        left = time.monotonic()
        assert wait_until(lambda: load.settled(left, after=20), 10)
        assert load.served_by("app1", left) == 0
        print(f"host removed from DNS: gone from the pool after {left - removed:.2f} s")

        # DNS fails: the members stay.
        dns.process.kill()
        assert wait_until(lambda: "did not resolve: its members are kept" in edge.log(), 20)
        assert list(servers(edge)) == [f"app/{app2.addr}:8000"]
    finally:
        load.stop()
    assert failures(load.results) == [], collections.Counter(r[2] for r in load.results)


SITE = {"Host": "www.example.test"}
SYNC_INTERVAL = 0.5


def cached_page(host):
    return requests.get(host.url("/page"), headers=SITE, timeout=5)


def test_a_purge_on_one_app_host_reaches_every_app_host(cluster, tmp_path):
    """Three app hosts with the accelerator, peers of each other through one DNS name (each
    leaves itself out). A purge made on one (application code, `PURGE`, the admin API) is
    applied on all before the call returns; a host cut off during a purge replays it once it
    is back."""
    dns = cluster.dns()
    version = tmp_path / "version"
    version.write_text("v1")
    config = (
        "[cluster]\n"
        'peers = ["http://apps.cluster.test:9000"]\n'
        'secret = "cluster-secret"\n'
        'purge_timeout = "1s"\n'
        f'sync_interval = "{int(SYNC_INTERVAL * 1000)}ms"\n'
        'resolve_interval = "1s"\n'
        "[accelerator]\n"
        'purge_from = ["0.0.0.0/0"]\n'
    )
    names = ["app1", "app2", "app3"]
    # DNS first: each host resolves its peers when it starts.
    hosts = [cluster.host(name) for name in names]
    dns.set("apps.cluster.test", hosts)
    for host in hosts:
        host.start_strata("--app", "node", "--chdir", str(APPS), "--virtualenv", str(VENV),
                          "--tiers", "lb,accelerator,app", "--workers", "2", config=config,
                          env={"NODE_NAME": host.name, "VERSION_FILE": str(version)})

    def peers_reachable(host):
        peers = host.admin("/status").json()["cluster"]["peers"]
        return len(peers) == 2 and all(p["reachable"] for p in peers)

    assert wait_until(lambda: all(peers_reachable(h) for h in hosts), 20), \
        [h.admin("/status").json()["cluster"] for h in hosts]

    def serve_version(expected):
        return all(cached_page(h).text == f"{h.name} {expected}" for h in hosts)

    def purge_everywhere(how, on):
        """Bumps the site's version, purges through `how` on host `on`, and checks every
        host serves the new version right after the call returns."""
        before = version.read_text()
        assert serve_version(before)
        after = f"v{int(before[1:]) + 1}"
        version.write_text(after)
        assert serve_version(before), "still cached"
        started = time.monotonic()
        if how == "app":
            answer = requests.get(on.url("/purge?url=/page"), headers=SITE, timeout=10)
            assert answer.text == "1", answer.text
        elif how == "PURGE":
            answer = requests.request("PURGE", on.url("/page"), headers=SITE, timeout=10)
            assert answer.headers["strata-purged"] == "1", answer.headers
            assert "strata-purge-missed" not in answer.headers
        else:
            answer = requests.post(on.url("/cache/purge?url=www.example.test/page", 9000),
                                   headers={"Authorization": "Bearer cluster-test-token"},
                                   timeout=10)
            assert answer.json()["missed"] == [], answer.json()
        took = time.monotonic() - started
        # Polled right after the call returned: no host may still serve the old page.
        served = {h.name: cached_page(h).text for h in hosts}
        assert served == {h.name: f"{h.name} {after}" for h in hosts}, (how, served)
        return took

    ways = ["app", "PURGE", "admin"]
    took = sorted(purge_everywhere(ways[i % 3], hosts[i % 3]) for i in range(30))
    p99 = took[int(len(took) * 0.99)]
    print(f"\n30 purges across three hosts (each applied everywhere when the call returned):"
          f" median {took[len(took) // 2] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")

    # A host cut off while a purge is made serves the old page until it is back, then
    # replays the purge it missed within a catch-up interval or two.
    hosts[2].cut()
    assert wait_until(lambda: not all(p["reachable"] for p in
                                      hosts[0].admin("/status").json()["cluster"]["peers"]), 10)
    version.write_text("v9")
    started = time.monotonic()
    answer = requests.post(hosts[0].url("/cache/purge?url=www.example.test/page", 9000),
                           headers={"Authorization": "Bearer cluster-test-token"}, timeout=10)
    took = time.monotonic() - started
    assert answer.json()["missed"] == [f"http://{hosts[2].addr}:9000"], answer.json()
    assert took < 0.5, "an unreachable peer is not waited for"
    missed = [line for line in hosts[0].admin("/metrics").text.splitlines()
              if 'strata_cluster_purges_total{event="missed_by_peer"}' in line]
    assert float(missed[0].split()[-1]) >= 1, missed
    # Only nodes with the cluster's secret may push purges.
    forged = requests.post(hosts[1].url("/cluster/purge", 9000), timeout=5,
                           headers={"Authorization": "Bearer cluster-test-token"},
                           data=b'{"node": 1, "seq": 1, "purge": {"all": true}}')
    assert forged.status_code == 401, forged.text
    assert cached_page(hosts[0]).text == "app1 v9"
    assert cached_page(hosts[1]).text == "app2 v9"
    hosts[2].heal()
    healed = time.monotonic()
    assert wait_until(lambda: cached_page(hosts[2]).text == "app3 v9", 10)
    caught_up = time.monotonic() - healed
    print(f"cut-off host: purge missed, replayed {caught_up:.2f} s after it was back"
          f" (catch-up every {SYNC_INTERVAL} s)")
    assert caught_up <= 3 * SYNC_INTERVAL + 1


def test_a_cache_tier_of_two_hosts(cluster, tmp_path):
    """Two cache hosts, named by one DNS name, behind StrataCache on two app hosts: keys
    placed as pymemcache's HashClient places them, get_or_set computed once across hosts, and a cache host killed
    costs misses (only its keys), never an error."""
    from pymemcache.client.base import Client
    from pymemcache.client.hash import HashClient
    from pymemcache.client.rendezvous import RendezvousHash

    dns = cluster.dns()
    caches = [cluster.host(name) for name in ("cache1", "cache2")]
    for host in caches:
        host.start_strata("--tiers", "cache")
    nodes = [f"{h.addr}:11211" for h in caches]
    # One name for the cache tier, as a headless Service gives: every address a node.
    dns.set("cache.cluster.test", caches)
    config = ('[cache]\nnodes = ["cache.cluster.test:11211"]\n'
              'node_timeout = "300ms"\ndead_time = "30s"\n')
    log = tmp_path / "dogpile.log"
    log.touch()
    apps = [app_host(cluster, name, config=config, env={"DOGPILE_LOG": str(log)},
                     app="dogpile") for name in ("app1", "app2")]
    get = lambda host, path: requests.get(host.url(path), timeout=10)  # noqa: E731

    assert get(apps[0], "/ops").text == "ok"
    n = 300
    assert get(apps[0], f"/fill?n={n}").text == str(n)
    assert get(apps[1], f"/count?n={n}").text == str(n)

    # Where each key is: where pymemcache's HashClient looks for it.
    hashing = HashClient([(h.addr, 11211) for h in caches])
    assert all(hashing.get(f":1:k{i}") == f"k{i}".encode() for i in range(n))
    direct = {h.addr: Client((h.addr, 11211)) for h in caches}
    ring = RendezvousHash([f"{h.addr}:11211" for h in caches])
    on_second = [i for i in range(n) if ring.get_node(f":1:k{i}") == nodes[1]]
    for i in range(n):
        owner = ring.get_node(f":1:k{i}").split(":")[0]
        assert [a for a, c in direct.items() if c.get(f":1:k{i}") is not None] == [owner]
    print(f"\ncache keys: {n - len(on_second)} on cache1, {len(on_second)} on cache2")

    # get_or_set: computed once across every worker of both app hosts.
    def hot_round():
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda i: get(apps[i % 2], "/hot"), range(24)))
        assert all(a.status_code == 200 for a in answers), [a.status_code for a in answers]
        return {a.text for a in answers}

    assert len(hot_round()) == 1
    assert len(log.read_text().split()) == 1

    # A cache host dies: misses for its keys, no errors, the others' keys stay put.
    caches[1].kill()
    killed = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(lambda i: get(apps[i % 2], f"/count?n={n}"), range(8)))
    assert all(c.status_code == 200 for c in counts), [c.status_code for c in counts]
    assert {int(c.text) for c in counts} == {n - len(on_second)}, [c.text for c in counts]
    took = time.monotonic() - killed
    print(f"cache host killed: {len(on_second)} of {n} keys missed ({len(on_second) / n:.0%}),"
          f" the rest found; no error; first answers within {took:.2f} s")
    runs = len(log.read_text().split())
    hot_owner_dead = ring.get_node(":1:hot") == nodes[1]
    assert len(hot_round()) == 1
    assert len(log.read_text().split()) == runs + (1 if hot_owner_dead else 0)
    assert get(apps[1], "/ops").text == "ok"


def test_rolling_reloads_upgrades_and_restarts_of_the_app_hosts_cost_no_request(cluster):
    """The edge checks each app host's `/readyz` on its admin port; an app host told to stop
    stays up for `lb.shutdown_delay` while saying it is not ready, so the edge takes it out
    before it stops accepting. Reloads, then binary upgrades (a new master takes the sockets
    over), then restarts, host by host, under load."""
    delay = DETECTION + 0.5
    config = f'[lb]\nshutdown_delay = "{int(delay * 1000)}ms"\n'
    apps = [app_host(cluster, f"app{i}", config=config) for i in (1, 2, 3)]
    edge = edge_host(cluster, apps, health_path='"/readyz"', health_port=9000)
    load = Load(edge.url("/?sleep=0.02"))
    try:
        assert wait_until(lambda: all(load.served_by(a.name, 0) > 5 for a in apps), 20)
        for app in apps:
            answer = requests.post(app.url("/reload", 9000), timeout=60,
                                   headers={"Authorization": "Bearer cluster-test-token"})
            assert answer.json()["ok"], answer.text
        reloaded = len(load.results)
        for app in apps:
            app.upgrade_strata()
        upgraded = len(load.results)
        for app in apps:
            stopping = time.monotonic()
            app.stop_strata()
            stopped = time.monotonic() - stopping
            app.restart_strata()
            back = time.monotonic()
            assert wait_until(lambda: load.served_by(app.name, back) > 5, 20)
            print(f"\n{app.name}: stopped in {stopped:.2f} s (shutdown_delay {delay:.2f} s),"
                  f" serving again {time.monotonic() - back:.2f} s after its start")
            # Its idle connections (the reload's, from the test) do not hold the stop up.
            assert stopped < delay + 5
    finally:
        load.stop()
    failed = failures(load.results)
    print(f"rolling reload, binary upgrade, then restart of 3 app hosts: {len(load.results)}"
          f" requests ({reloaded} through the reloads, {upgraded - reloaded} through the"
          f" upgrades), {len(failed)} failed")
    assert failed == [], collections.Counter(r[2] for r in failed)


def test_every_app_host_failing_its_checks_at_once_leaves_the_edge_serving(cluster):
    """A check that fails everywhere at once (here: the port it asks is closed on every host,
    as a broken shared dependency or check would) puts the pool in panic: the edge keeps
    sending to all hosts rather than take the site down."""
    apps = [app_host(cluster, f"app{i}") for i in (1, 2, 3)]
    edge = edge_host(cluster, apps, health_port=9999)
    assert wait_until(lambda: not any(s["up"] for s in servers(edge).values()), 10)
    load = Load(edge.url("/?sleep=0.01"), clients=3)
    try:
        assert wait_until(lambda: all(load.served_by(a.name, 0) > 3 for a in apps), 20)
    finally:
        load.stop()
    panics = [line for line in edge.admin("/metrics").text.splitlines()
              if 'event="panic"' in line]
    print(f"\nevery check failing: {len(load.results)} requests served by all three hosts,"
          f" {failures(load.results)} failed; {panics}")
    assert failures(load.results) == []
    assert float(panics[0].split()[-1]) > 0


class NetPostgres(Postgres):
    """The test PostgreSQL, run inside `host` and listening on its address, accepting
    password logins from the cluster's subnet."""

    def __init__(self, host):
        self.host = host
        super().__init__()

    def run(self, tool, *args):
        if tool in ("pg_ctl",):
            args = [a.replace("listen_addresses=127.0.0.1", f"listen_addresses={self.host.addr}")
                    for a in args]
            hba = self.data / "pg_hba.conf"
            line = f"host all all {self.host.cluster.prefix}.0/24 scram-sha-256\n"
            if line not in hba.read_text():
                with open(hba, "a") as out:
                    out.write(line)
            command = ["ip", "netns", "exec", self.host.ns, *self.as_user, str(self.bin / tool),
                       *args]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
            return
        super().run(tool, *args)


def test_the_pooler_host_rides_out_a_postgres_restart(cluster):
    """The example Django site on an app host, its database through a pooler host in front of
    PostgreSQL on a third host. PostgreSQL restarts under load: requests fail cleanly and
    quickly meanwhile, and everything recovers without touching Strata."""
    db, pooler, app = cluster.host("db"), cluster.host("pooler"), cluster.host("app1")
    pg = NetPostgres(db)
    try:
        env = {"EXAMPLE_PG_HOST": db.addr, "EXAMPLE_PG_PORT": str(pg.port),
               "EXAMPLE_PG_PASSWORD": PG_PASSWORD, "EXAMPLE_DB": "unused"}
        import psycopg
        with psycopg.connect(host=db.addr, port=pg.port, user="postgres",
                             password=PG_PASSWORD, dbname="postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE example")
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=EXAMPLE,
                       env={**os.environ, **env}, check=True, timeout=300)
        pooler.start_strata("--tiers", "dbpool", config=(
            "[dbpool]\n"
            f'bind = "{pooler.addr}:6432"\n'
            f'server = "{db.addr}:{pg.port}"\n'
            f'server_user = "postgres"\nserver_password = "{PG_PASSWORD}"\n'
            'auth = "trust"\ndatabases = ["example"]\n'))
        app.start_strata("--app", "mysite.wsgi", "--chdir", str(EXAMPLE), "--virtualenv",
                         str(VENV), "--tiers", "lb,app", "--workers", "2",
                         env={**env, "EXAMPLE_PG_HOST": pooler.addr, "EXAMPLE_PG_PORT": "6432"})
        load = Load(app.url("/"), clients=4, headers={"Host": "localhost"})
        try:
            assert wait_until(lambda: len(load.results) > 20 and not failures(load.results), 30)
            restarting = time.monotonic()
            pg.restart()
            restarted = time.monotonic()
            assert wait_until(lambda: any(r[0] > restarted and r[2] == 200
                                          for r in load.results), 30)
            recovered = time.monotonic()
            assert wait_until(lambda: load.settled(recovered, after=20), 30)
        finally:
            load.stop()
        during = [r for r in load.results if r[1] >= restarting]
        failed = failures(during)
        longest = max(done - sent for sent, done, _, _ in during)
        late = failures([r for r in load.results if r[0] >= recovered])
        print(f"\npostgres restart ({restarted - restarting:.2f} s) behind the pooler host:"
              f" {len(failed)} of {len(during)} requests failed"
              f" ({collections.Counter(r[2] for r in failed)}), longest {longest:.2f} s,"
              f" serving again {recovered - restarted:.2f} s after it was back")
        assert all(r[2] in (500, 502, 503) for r in failed), failed
        assert longest < 10
        assert late == [], late
    finally:
        pg.stop()

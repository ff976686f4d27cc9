"""The load balancer's backend pools: several backend servers (small HTTP servers, or this
node's own app server), one killed, one slow, one coming up under load, most unhealthy;
retries, queueing, direct access and forwarded headers."""

import collections
import shutil
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import APPS, app, free_port, wait_for_port, wait_until


class Backend:
    """One `tests/apps/backend.py` process."""

    def __init__(self, tmp_path, name, *args, start=True):
        self.name = name
        self.port = free_port()
        self.sick = tmp_path / f"{name}.sick"
        self.args = [sys.executable, str(APPS / "backend.py"), str(self.port), name,
                     "--sick-flag", str(self.sick), *args]
        self.process = None
        if start:
            self.start()

    def start(self):
        self.process = subprocess.Popen(self.args)
        assert wait_for_port(self.port, 10, self.process)

    def kill(self):
        self.process.kill()
        self.process.wait()


@pytest.fixture
def backends(tmp_path):
    started = []

    def start(name, *args, **kwargs):
        backend = Backend(tmp_path, name, *args, **kwargs)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        if backend.process and backend.process.poll() is None:
            backend.kill()


def pool_config(servers, **settings):
    lines = ["[lb]", 'default_backend = "web"']
    lines += [f"{k} = {v}" for k, v in settings.pop("lb", {}).items()]
    pool = {"health_path": '"/health"', "health_interval": '"200ms"', "rise": 1, "fall": 1,
            "slow_start": '"0s"', **settings}
    lines += ["[[lb.backends]]", 'name = "web"']
    lines += [f"{k} = {v}" for k, v in pool.items()]
    for server in servers:
        url = "local" if server == "local" else f"http://127.0.0.1:{server.port}"
        name = "local" if server == "local" else server.name
        lines += ["[[lb.backends.servers]]", f'name = "{name}"', f'url = "{url}"']
    return "\n".join(lines) + "\n"


def balancer(strata, servers, **settings):
    return strata("--tiers", "lb", config=pool_config(servers, **settings))


def load(url, seconds, clients=4, **kwargs):
    """Requests from `clients` threads for `seconds`: [(when, status, body)]."""
    results, stop = [], time.monotonic() + seconds

    def run():
        session = requests.Session()
        while time.monotonic() < stop:
            try:
                response = session.get(url, timeout=10, **kwargs)
                results.append((time.monotonic(), response.status_code, response.text))
            except requests.RequestException as error:
                results.append((time.monotonic(), repr(error), ""))

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def servers_of(server):
    return {s["name"]: s for s in server.status()["lb"]["backends"][0]["servers"]}


def test_requests_spread_and_a_killed_server_costs_no_errors(strata, backends):
    a, b, c = backends("a"), backends("b"), backends("c")
    server = balancer(strata, [a, b, c], retries=1)
    seen = collections.Counter(body for _, _, body in load(server.url("/"), 1))
    assert set(seen) == {"a", "b", "c"}, seen
    b.kill()
    # Requests that meet the dead server before the checks notice are retried elsewhere.
    results = load(server.url("/"), 2)
    assert results and all(status == 200 for _, status, _ in results), \
        collections.Counter(status for _, status, _ in results)
    assert {body for _, _, body in results} <= {"a", "c"}
    assert wait_until(lambda: not servers_of(server)["b"]["up"])


def test_a_slow_server_gets_little_traffic(strata, backends):
    fast, slow = backends("fast"), backends("slow", "--delay", "0.2")
    server = balancer(strata, [fast, slow])
    bodies = collections.Counter(body for _, _, body in load(server.url("/"), 3, clients=6))
    assert bodies["slow"] < 0.1 * sum(bodies.values()), bodies


def test_a_response_head_late_past_the_pool_timeout_is_a_504(strata, backends):
    """The timeout holds on a kept-alive connection whose earlier request armed its timer."""
    slow = backends("slow", "--delay", "1.5")
    server = balancer(strata, [slow], timeout='"500ms"', eject_after=100)
    session = requests.Session()
    # `/headers` answers at once: the connection to the backend is pooled, its timer armed.
    assert session.get(server.url("/headers"), timeout=10).status_code == 200
    time.sleep(0.3)
    started = time.monotonic()
    late = session.get(server.url("/"), timeout=10)
    waited = time.monotonic() - started
    assert late.status_code == 504, late.text
    assert 0.4 < waited < 1.3, waited
    # A request in time afterwards is served.
    assert session.get(server.url("/headers"), timeout=10).status_code == 200


def test_a_server_coming_up_under_load_ramps_up_slowly(strata, backends):
    old = backends("old", "--delay", "0.02")
    new = backends("new", "--delay", "0.02", start=False)
    server = balancer(strata, [old, new], slow_start='"4s"')
    assert wait_until(lambda: not servers_of(server)["new"]["up"])
    results = []
    loader = threading.Thread(target=lambda: results.extend(load(server.url("/"), 9, clients=6)))
    loader.start()
    time.sleep(1)
    new.start()
    up_at = time.monotonic()
    loader.join()

    def share(start, end):
        window = [body for when, _, body in results if up_at + start <= when < up_at + end]
        return window.count("new") / max(len(window), 1)

    early, late = share(0.3, 1.5), share(5.5, 8)
    assert early < late and late > 0.3, (early, late)
    assert all(status == 200 for _, status, _ in results)


def test_panic_mode_serves_from_all_when_most_look_unhealthy(strata, backends):
    a, b, c = backends("a"), backends("b"), backends("c")
    server = balancer(strata, [a, b, c], panic_threshold=0.5)
    b.sick.touch()
    assert wait_until(lambda: not servers_of(server)["b"]["up"])
    # One of three down: the pool avoids it.
    seen = collections.Counter(requests.get(server.url("/")).text for _ in range(40))
    assert "b" not in seen
    a.sick.touch()
    c.sick.touch()
    assert wait_until(lambda: not any(s["up"] for s in servers_of(server).values()))
    # All down by their checks, yet they answer: the site stays up on all of them.
    seen = collections.Counter(body for _, _, body in load(server.url("/"), 1))
    assert set(seen) == {"a", "b", "c"}, seen
    assert 'event="panic"' in server.admin("/metrics").text


def test_failing_servers_are_ejected_but_never_more_than_the_share(strata, backends):
    good = backends("good")
    bad1, bad2 = backends("bad1", "--status", "503"), backends("bad2", "--status", "503")
    server = balancer(strata, [good, bad1, bad2], eject_after=2, max_ejection=0.34,
                      panic_threshold=0, balance='"round-robin"')
    for _ in range(30):
        requests.get(server.url("/"))
    states = servers_of(server)
    assert [name for name, s in states.items() if s["ejected"]] in (["bad1"], ["bad2"])
    assert not states["good"]["ejected"]


def test_only_idempotent_requests_are_retried(strata, backends):
    good = backends("good")
    dead = backends("dead", start=False)
    server = balancer(strata, [good, dead], health_interval='"1h"', retries=1,
                      balance='"round-robin"', eject_after=1000)
    gets = [requests.get(server.url("/")) for _ in range(10)]
    assert [r.status_code for r in gets] == [200] * 10
    posts = [requests.post(server.url("/"), data=b"x" * 100) for _ in range(10)]
    statuses = collections.Counter(r.status_code for r in posts)
    assert statuses[502] > 0 and statuses[200] > 0, statuses
    assert 'event="retry"} 0' not in server.admin("/metrics").text


def test_requests_queue_for_a_server_at_max_conn(strata, backends):
    slow = backends("slow", "--delay", "0.6")
    config = pool_config([slow], queue_timeout='"200ms"').replace(
        'url = "http', 'max_conn = 1\nurl = "http')
    server = strata("--tiers", "lb", config=config)
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(
        requests.get(server.url("/")).status_code)) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert sorted(answers) == [200, 503]


def test_direct_access_needs_trust_or_the_token(strata, backends):
    a, b = backends("a"), backends("b")
    server = strata("--tiers", "lb", config=pool_config([a, b]) + '[admin]\ntoken = "s3cret"\n')
    refused = requests.get(server.url("/"), headers={"X-Strata-Backend": "b"})
    assert refused.status_code == 403
    for _ in range(5):
        asked = requests.get(server.url("/"), headers={"X-Strata-Backend": "b",
                                                       "X-Strata-Token": "s3cret"})
        assert asked.text == "b"
    trusting = strata("--tiers", "lb",
                      config=pool_config([a, b], lb={"trusted_networks": '["127.0.0.0/8"]'}))
    for _ in range(5):
        assert requests.get(trusting.url("/"), headers={"X-Strata-Backend": "a"}).text == "a"
    # A sick server can still be reached this way, for debugging it.
    a.sick.touch()
    assert wait_until(lambda: not servers_of(trusting)["a"]["up"])
    assert requests.get(trusting.url("/"), headers={"X-Strata-Backend": "a"}).text == "a"
    unknown = requests.get(trusting.url("/"), headers={"X-Strata-Backend": "zz"})
    assert unknown.status_code == 404


def test_forwarded_headers_are_believed_only_from_trusted_networks(strata, backends):
    a = backends("a")
    spoofed = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"}
    untrusting = balancer(strata, [a])
    seen = requests.get(untrusting.url("/headers"), headers=spoofed).text.lower()
    assert "x-forwarded-for: 127.0.0.1" in seen and "6.6.6.6" not in seen
    assert "x-forwarded-proto: http\n" in seen + "\n"
    trusting = balancer(strata, [a], lb={"trusted_networks": '["127.0.0.1"]'})
    seen = requests.get(trusting.url("/headers"), headers=spoofed).text.lower()
    assert "x-forwarded-for: 6.6.6.6, 127.0.0.1" in seen
    assert "x-forwarded-proto: https" in seen


def test_the_local_app_server_is_a_backend_checked_by_its_supervisor(strata, backends):
    remote = backends("remote")
    server = strata(*app("hello", tiers="lb,app"),
                    config=pool_config(["local", remote], balance='"round-robin"'))
    bodies = collections.Counter(requests.get(server.url("/")).text for _ in range(40))
    assert set(bodies) == {"Hello, World!", "remote"}, bodies
    time.sleep(0.5)
    assert servers_of(server)["local"]["up"]


def tls_pool(servers, ca, cert=None, key=None, **settings):
    """`pool_config` for https:// servers ((name, url) pairs) checked against `ca`."""
    lines = ["[lb]", 'default_backend = "web"', "[[lb.backends]]", 'name = "web"',
             'health_path = "/"', 'health_interval = "200ms"', "rise = 1", "fall = 1",
             'slow_start = "0s"']
    lines += [f"{k} = {v}" for k, v in settings.items()]
    lines += ["[lb.backends.tls]", f'ca_file = "{ca}"']
    if cert:
        lines += [f'cert_file = "{cert}"', f'key_file = "{key}"']
    for name, url in servers:
        lines += ["[[lb.backends.servers]]", f'name = "{name}"', f'url = "{url}"']
    return "\n".join(lines) + "\n"


def test_https_backends_are_verified_and_kept_alive(strata, test_ca, tmp_path):
    """The pool reaches another node's HTTPS listener: its certificate checked against the
    pool's CA (another CA's certificate is refused, 502), connections kept alive."""
    port = free_port()
    backend = strata(*app("probe"), config=(
        "[lb]\n"
        f'tls_bind = "127.0.0.1:{port}"\n'
        f'tls_cert_file = "{test_ca["cert"]}"\ntls_key_file = "{test_ca["key"]}"\n'))
    good = strata("--tiers", "lb", config=tls_pool(
        [("node", f"https://localhost:{port}")], test_ca["ca"]))
    session = requests.Session()
    answers = [session.get(good.url("/environ"), timeout=10) for _ in range(20)]
    assert all(a.status_code == 200 for a in answers), [a.status_code for a in answers]
    environ = answers[-1].json()
    assert environ["wsgi.url_scheme"] == "https"
    # The backend offers HTTP/2 by ALPN: the pool speaks it, one connection for every request.
    assert environ["SERVER_PROTOCOL"] == "HTTP/2", environ
    # Twenty requests (and the health checks) over kept-alive TLS connections: a few at most.
    established = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
                                 capture_output=True, text=True).stdout.splitlines()
    assert 1 <= len(established) <= 2, established
    wrong = strata("--tiers", "lb", config=tls_pool(
        [("node", f"https://localhost:{port}")], test_ca["other_ca"], eject_after=100))
    assert requests.get(wrong.url("/environ"), timeout=10).status_code == 502
    # The accelerator fronting the same node over HTTPS.
    front = strata("--tiers", "lb,accelerator", "--upstream", f"https://localhost:{port}",
                   config=f'[accelerator.upstream_tls]\nca_file = "{test_ca["ca"]}"\n')
    fronted = requests.get(front.url("/environ"), timeout=10)
    assert fronted.status_code == 200 and fronted.json()["wsgi.url_scheme"] == "https"


def test_mutual_tls_to_a_backend_and_a_new_client_certificate_without_restart(
        strata, test_ca, tmp_path):
    port = free_port()
    backend = subprocess.Popen([sys.executable, str(APPS / "tls_backend.py"), str(port),
                                str(test_ca["cert"]), str(test_ca["key"]), str(test_ca["ca"])])
    try:
        assert wait_for_port(port, 10, backend)
        cert, key = tmp_path / "client.pem", tmp_path / "client.key"
        shutil.copy(test_ca["client1_cert"], cert)
        shutil.copy(test_ca["client1_key"], key)
        edge = strata("--tiers", "lb", config=tls_pool(
            [("mtls", f"https://127.0.0.1:{port}")], test_ca["ca"], cert, key))
        assert requests.get(edge.url("/"), timeout=10).text == "strata-client-1"
        # A renewed client certificate is used by new connections, without a restart.
        shutil.copy(test_ca["client2_cert"], cert)
        shutil.copy(test_ca["client2_key"], key)
        assert wait_until(
            lambda: requests.get(edge.url("/"), timeout=10).text == "strata-client-2", 20)
        # Without a client certificate the backend refuses the handshake: 502.
        bare = strata("--tiers", "lb", config=tls_pool(
            [("mtls", f"https://127.0.0.1:{port}")], test_ca["ca"], eject_after=100))
        assert requests.get(bare.url("/"), timeout=10).status_code == 502
    finally:
        backend.kill()
        backend.wait()

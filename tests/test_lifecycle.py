"""Workers crash, hang, leak and get recycled; the server loses nothing else."""

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from conftest import app, children, metric, wait_until


def test_crash_fails_only_that_request_and_is_replaced(strata):
    server = strata(*app("lifecycle", "--workers", "2"))
    before = server.worker_pids()
    with ThreadPoolExecutor(4) as pool:
        slow = pool.submit(requests.get, server.url("/sleep?s=1"))
        server.wait_busy()
        crashed = requests.get(server.url("/exit"))
        assert crashed.status_code == 502
        assert slow.result().status_code == 200
    segv = requests.get(server.url("/segfault"))
    assert segv.status_code == 502
    assert wait_until(lambda: len(server.worker_pids()) == 2)
    after = server.worker_pids()
    assert len(set(after) & set(before)) <= 1
    assert metric(server, 'strata_app_worker_restarts_total{cause="crash"}') == 2
    for _ in range(10):
        assert requests.get(server.url("/")).status_code == 200
    assert "killed by SIGSEGV" in server.log()


def test_timeout_logs_stack_kills_and_replaces(strata):
    server = strata(*app("lifecycle", "--workers", "1"), config='[app]\ntimeout = "1s"\n')
    pid = server.worker_pids()[0]
    started = time.monotonic()
    response = requests.get(server.url("/sleep?s=30"))
    assert response.status_code == 504
    assert time.monotonic() - started < 5
    assert wait_until(lambda: server.worker_pids() and server.worker_pids()[0] != pid)
    assert requests.get(server.url("/")).status_code == 200
    log = server.log()
    assert "stuck_in_sleep" in log and "lifecycle.py" in log, log
    assert metric(server, 'strata_app_worker_restarts_total{cause="timeout"}') == 1


def test_max_requests_recycles_without_failures(strata):
    server = strata(*app("lifecycle", "--workers", "2"),
                    config="[app]\nmax_requests = 20\nmax_requests_jitter = 5\n")
    first = set(server.worker_pids())
    session = requests.Session()
    pids = set()
    # A retiring worker serves on until its successor is ready (capacity is never dropped),
    # so on a loaded machine a worker may pass its limit: go on until five have served.
    deadline = time.monotonic() + 60
    while len(pids) < 5 and time.monotonic() < deadline:
        response = session.get(server.url("/"))
        assert response.status_code == 200
        pids.add(int(response.text))
    assert len(pids) >= 5, pids
    assert wait_until(lambda: len(server.worker_pids()) == 2)
    # Every worker that served was retired at its limit; none served past it.
    assert all(w["requests"] <= 25 for w in server.status()["app"]["workers"])
    assert first - set(server.worker_pids()), "the worker that served was recycled"
    # Both first workers take requests from the shared queue; every other pid is a successor.
    assert metric(server, 'strata_app_worker_restarts_total{cause="max_requests"}') >= len(pids) - 2


def test_memory_limit_recycles(strata):
    server = strata(*app("lifecycle", "--workers", "1"), config="[app]\nmax_rss_mb = 150\n")
    pid = server.worker_pids()[0]
    for _ in range(4):
        assert requests.get(server.url("/grow?mb=60")).status_code == 200
    assert wait_until(lambda: server.worker_pids() and server.worker_pids()[0] != pid)
    assert metric(server, 'strata_app_worker_restarts_total{cause="memory"}') == 1
    assert requests.get(server.url("/")).status_code == 200


def test_queue_full_and_queue_timeout_are_503(strata):
    server = strata(*app("lifecycle", "--workers", "1"),
                    config='[app]\nqueue_length = 1\nqueue_timeout = "1s"\n')
    with ThreadPoolExecutor(4) as pool:
        busy = pool.submit(requests.get, server.url("/sleep?s=3"))
        server.wait_busy()
        waiting = pool.submit(requests.get, server.url("/"))
        server.wait_busy(queued=1)
        full = requests.get(server.url("/"))
        assert full.status_code == 503
        assert "queue is full" in full.text
        timed_out = waiting.result()
        assert timed_out.status_code == 503
        assert "within 1s" in timed_out.text
        assert busy.result().status_code == 200
    assert requests.get(server.url("/")).status_code == 200


def test_requests_given_up_while_queued_never_run(strata):
    server = strata(*app("lifecycle", "--workers", "1"), config='[app]\nqueue_timeout = "1s"\n')
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(requests.get, server.url("/sleep?s=2.5"))
        assert wait_until(lambda: server.status()["app"]["workers"][0]["state"] == "busy")
        # A client that leaves while its request waits for the worker.
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"GET /mark?tag=left HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.2)
        # A request whose queue time runs out.
        expired = requests.get(server.url("/mark?tag=expired"))
        assert expired.status_code == 503 and "within 1s" in expired.text
        assert busy.result().status_code == 200
    assert requests.get(server.url("/mark?tag=served")).status_code == 200
    assert requests.get(server.url("/marks")).text == "served"


def test_queue_length_zero_serves_only_when_a_worker_is_idle(strata):
    server = strata(*app("lifecycle", "--workers", "1"), config="[app]\nqueue_length = 0\n")
    assert requests.get(server.url("/")).status_code == 200
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(requests.get, server.url("/sleep?s=2"))
        assert wait_until(lambda: server.status()["app"]["workers"][0]["state"] == "busy")
        refused = requests.get(server.url("/"))
        assert refused.status_code == 503 and "queue is full" in refused.text
        assert busy.result().status_code == 200
    assert requests.get(server.url("/")).status_code == 200


def test_keepalive_does_not_pin_a_worker(strata):
    server = strata(*app("lifecycle", "--workers", "1"))
    clients = [requests.Session() for _ in range(3)]
    for _ in range(5):
        for client in clients:
            assert client.get(server.url("/"), timeout=5).status_code == 200


def test_sigterm_finishes_in_flight_requests(strata):
    server = strata(*app("lifecycle", "--workers", "2"))
    result = {}

    def slow():
        result["response"] = requests.get(server.url("/sleep?s=4"))

    thread = threading.Thread(target=slow)
    thread.start()
    server.wait_busy()
    server.signal(signal.SIGTERM)
    # New connections are refused at once (a balancer in front retries elsewhere), not
    # queued until the process exits, while the request in flight finishes.
    assert wait_until(lambda: refused(server.port), timeout=3)
    assert thread.is_alive(), "refused while the slow request was still in flight"
    thread.join()
    assert result["response"].status_code == 200
    assert server.wait() == 0


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def test_second_sigint_stops_at_once(strata):
    server = strata(*app("lifecycle", "--workers", "1"))
    def stuck():
        try:
            requests.get(server.url("/sleep?s=30"))
        except requests.ConnectionError:
            pass  # Expected: the server stops without answering.

    thread = threading.Thread(target=stuck, daemon=True)
    thread.start()
    server.wait_busy()
    started = time.monotonic()
    server.signal(signal.SIGINT)
    time.sleep(0.3)
    assert server.process.poll() is None, "one SIGINT waits for in-flight requests"
    server.signal(signal.SIGINT)
    assert server.wait(timeout=10) != 0
    assert time.monotonic() - started < 5


def test_workers_dying_at_start_are_replaced_and_throttled(strata, tmp_path):
    flag = tmp_path / "die"
    server = strata(*app("lifecycle", "--workers", "2"), env={"LIFECYCLE_DIE_FLAG": str(flag)})
    flag.write_text("")
    assert requests.get(server.url("/exit")).status_code == 502
    time.sleep(3)
    # Every fork dies at once; without a throttle this would be hundreds of forks.
    restarts = metric(server, 'strata_app_worker_restarts_total{cause="crash"}')
    assert 5 <= restarts <= 12, restarts
    assert "delaying the next fork" in server.log()
    assert requests.get(server.url("/")).status_code == 200, "the other worker still serves"
    flag.unlink()
    assert wait_until(lambda: len(server.worker_pids()) == 2)


def test_clients_that_leave_do_not_cost_a_worker(strata):
    server = strata(*app("lifecycle", "--workers", "1"))
    pid = server.worker_pids()[0]
    # Leave while the application is still working on the request.
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET /sleep?s=0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(1.0)
    # Leave in the middle of a long streamed response.
    with requests.get(server.url("/stream?count=200&delay=0.01"), stream=True) as response:
        next(response.iter_content(16))
    # Leave while waiting in the queue behind a busy worker.
    busy = threading.Thread(target=lambda: requests.get(server.url("/sleep?s=1")))
    busy.start()
    server.wait_busy()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        server.wait_busy(queued=1)
    busy.join()
    assert wait_until(lambda: [w["state"] for w in server.status()["app"]["workers"]]
                      == ["idle"])
    assert server.worker_pids() == [pid]
    assert metric(server, 'strata_app_worker_restarts_total{cause="crash"}') == 0
    assert requests.get(server.url("/")).text == str(pid)


def test_draining_answers_keepalive_requests_with_connection_close(strata):
    server = strata(*app("lifecycle", "--workers", "1"), config='[lb]\ndrain_linger = "2s"\n')
    session = requests.Session()
    assert session.get(server.url("/")).status_code == 200
    slow = threading.Thread(target=lambda: requests.get(server.url("/sleep?s=1")))
    slow.start()
    server.wait_busy()
    server.signal(signal.SIGTERM)
    assert wait_until(lambda: "SIGTERM" in server.log())
    # The idle keep-alive connection was not cut: its next request is answered, with close.
    response = session.get(server.url("/"))
    assert response.status_code == 200
    assert response.headers["Connection"] == "close"
    slow.join()
    assert server.wait() == 0


def test_a_dead_zygote_is_replaced_by_a_new_generation(strata):
    server = strata(*app("lifecycle", "--workers", "2"))
    (zygote,) = children(server.process.pid)
    os.kill(zygote, signal.SIGKILL)
    assert wait_until(lambda: server.status()["app"]["generation"] == 2
                      and {w["generation"] for w in server.status()["app"]["workers"]} == {2}
                      and len(server.status()["app"]["workers"]) == 2, timeout=30)
    assert "the zygote exited; starting a new generation" in server.log()
    # Workers can be replaced again.
    assert requests.get(server.url("/exit")).status_code == 502
    assert wait_until(lambda: len(server.worker_pids()) == 2)
    for _ in range(5):
        assert requests.get(server.url("/")).status_code == 200

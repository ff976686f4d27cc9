"""The PostgreSQL pooler against a real PostgreSQL started by the test harness, driven by
psycopg."""

import datetime
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import psycopg
import pytest
import requests

from conftest import (EXAMPLE, PG_PASSWORD, ROOT, STRATA, Postgres, free_port, metric,
                      wait_for_port, wait_until)
from test_wsgi import resident_kb


@pytest.fixture
def pooler(strata, postgres):
    """Starts a node running only the pooler, in front of the test PostgreSQL (or `server`,
    another one)."""

    def start(extra="", server=postgres):
        port = free_port()
        config = ("[dbpool]\n"
                  f'bind = "127.0.0.1:{port}"\n'
                  f'server = "127.0.0.1:{server.port}"\n'
                  f'server_user = "postgres"\nserver_password = "{PG_PASSWORD}"\n' + extra)
        server = strata("--tiers", "dbpool", config=config)
        server.dbpool_port = port
        return server

    return start


def raw_session(server):
    """A socket logged into a trusting pooler as postgres, its greeting read up to
    ReadyForQuery, for tests that write protocol bytes themselves."""
    params = b"user\0postgres\0database\0postgres\0\0"
    sock = socket.create_connection(("127.0.0.1", server.dbpool_port), timeout=10)
    sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    greeting = b""
    while not greeting.endswith(b"Z\0\0\0\x05I"):
        greeting += sock.recv(4096)
    return sock


def connect(server, **kwargs):
    params = dict(host="127.0.0.1", port=server.dbpool_port, user="postgres",
                  password=PG_PASSWORD, dbname="postgres", connect_timeout=10)
    params.update(kwargs)
    return psycopg.connect(**params)


def test_session_mode_keeps_one_server_connection_and_resets_it_between_clients(pooler):
    server = pooler('pool_mode = "session"\npool_size = 1\n')
    with connect(server) as conn:
        first_pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        assert conn.execute("select 1 + 1").fetchone()[0] == 2
        assert conn.info.parameter_status("server_version")
        conn.execute("create temp table scratch (x int)")
        conn.execute("set statement_timeout = '1234ms'")
        conn.commit()
        assert conn.execute("select pg_backend_pid()").fetchone()[0] == first_pid
    with connect(server) as conn:
        assert conn.execute("select pg_backend_pid()").fetchone()[0] == first_pid
        assert conn.execute("show statement_timeout").fetchone()[0] != "1234ms"
        assert conn.execute(
            "select count(*) from pg_tables where tablename = 'scratch'").fetchone()[0] == 0
    assert metric(server, 'strata_dbpool_events_total{event="opened"}') == 1
    assert metric(server, 'strata_dbpool_events_total{event="lent"}') == 2


@pytest.mark.parametrize("threads", [0, 2])
def test_transaction_mode_shares_few_server_connections_among_many_clients(pooler, threads):
    # threads = 2: sessions run on two threads of the pooler's own, sharing one pool.
    server = pooler(f'pool_size = 2\nthreads = {threads}\n')
    with connect(server, autocommit=True) as setup:
        setup.execute("drop table if exists shared; create table shared (client int, n int)")
    clients = [connect(server) for _ in range(12)]
    errors = []

    def work(index, conn):
        try:
            for n in range(15):
                with conn.transaction():
                    conn.execute("insert into shared values (%s, %s)", (index, n))
                    conn.execute("select pg_sleep(0.001)")
                assert conn.execute("select count(*) from shared where client = %s",
                                    (index,)).fetchone()[0] == n + 1
                conn.commit()
        except Exception as error:  # reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=work, args=pair) for pair in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for conn in clients:
        conn.close()
    assert errors == []
    with connect(server) as conn:
        assert conn.execute("select count(*) from shared").fetchone()[0] == 12 * 15
    assert metric(server, 'strata_dbpool_events_total{event="opened"}') <= 2
    assert metric(server, 'strata_dbpool_events_total{event="lent"}') > 12 * 15


def test_a_client_holds_its_server_connection_for_a_transaction_only(pooler):
    server = pooler('pool_size = 1\nquery_wait_timeout = "5s"\n')
    with connect(server) as first, connect(server) as second:
        first.execute("select 1")  # a transaction, still open (psycopg begins one)
        blocked = []
        thread = threading.Thread(
            target=lambda: blocked.append(second.execute("select 2").fetchone()[0]))
        thread.start()
        time.sleep(0.5)
        assert blocked == [], "the second client got the connection held by an open transaction"
        first.commit()
        thread.join(5)
        assert blocked == [2]
        second.commit()


def test_a_begin_takes_no_server_connection_until_the_transactions_first_statement(pooler):
    server = pooler('pool_size = 1\nquery_wait_timeout = "5s"\n')
    with connect(server, autocommit=True) as first, connect(server, autocommit=True) as second:
        second.execute("drop table if exists early; create table early (x int)")
        for begin in ["begin", "START TRANSACTION;"]:
            first.execute(begin)
            assert first.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            # The pool's only connection is still free for others.
            assert second.execute("select count(*) from early").fetchone()[0] == 0
            first.execute("insert into early values (1)")
            assert first.execute("select now() = statement_timestamp()").fetchone()[0] is False
            first.execute("rollback")
            assert first.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            # The insert was inside the transaction: rolled back, not committed on its own.
            assert second.execute("select count(*) from early").fetchone()[0] == 0
        first.execute("begin")
        first.execute("insert into early values (2)")
        first.execute("commit")
        assert second.execute("select array_agg(x) from early").fetchone()[0] == [2]
        with pytest.raises(psycopg.errors.SyntaxError):
            first.execute("begin isolation level bogus")


def test_a_client_that_vanishes_mid_transaction_leaves_nothing_behind(pooler):
    server = pooler('pool_size = 1\n')
    with connect(server, autocommit=True) as setup:
        setup.execute("drop table if exists vanish; create table vanish (x int)")
    # A client process that dies mid-transaction, without saying goodbye.
    script = (
        "import os, psycopg\n"
        f"c = psycopg.connect(host='127.0.0.1', port={server.dbpool_port}, user='postgres',"
        f" password='{PG_PASSWORD}', dbname='postgres')\n"
        "c.execute('insert into vanish values (1)')\n"
        "c.execute('select pg_advisory_xact_lock(99)')\n"
        "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    with connect(server) as conn:
        assert conn.execute("select count(*) from vanish").fetchone()[0] == 0
        assert conn.execute("select pg_try_advisory_xact_lock(99)").fetchone()[0] is True
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_psql_through_the_pooler(pooler, postgres, mode):
    server = pooler(f'pool_mode = "{mode}"\npool_size = 2\n')
    psql = postgres.bin / "psql"
    result = subprocess.run(
        [str(psql), "-h", "127.0.0.1", "-p", str(server.dbpool_port), "-U", "postgres",
         "-d", "postgres", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
         "-c", "select 40 + 2", "-c", "begin; select current_setting('application_name'); commit",
         "-c", "select 'a;b' as x; select 7"],
        env={"PGPASSWORD": PG_PASSWORD, "PATH": "/usr/bin:/bin"}, capture_output=True,
        text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["42", "BEGIN", "psql", "COMMIT", "a;b", "7"]


def test_a_full_pool_answers_a_clear_error_after_the_wait(pooler):
    server = pooler('pool_mode = "session"\npool_size = 1\nquery_wait_timeout = "2s"\n')

    def pool_state():
        return server.status()["dbpool"]["databases"][0]

    with connect(server):
        assert pool_state() == {"database": "postgres", "user": "postgres", "active": 1,
                                "idle": 0, "waiting": 0, "paused": False}
        outcomes = []

        def wait_in_line():
            try:
                connect(server).close()
                outcomes.append("connected")
            except psycopg.OperationalError as error:
                outcomes.append(str(error))

        waiter = threading.Thread(target=wait_in_line)
        waiter.start()
        assert wait_until(lambda: pool_state()["waiting"] == 1)
        with pytest.raises(psycopg.OperationalError, match="no server connection became free"):
            connect(server)
        waiter.join()
        assert len(outcomes) == 1 and "no server connection became free" in outcomes[0]
    assert wait_until(lambda: pool_state() == {"database": "postgres", "user": "postgres",
                                               "active": 0, "idle": 1, "waiting": 0,
                                               "paused": False})
    assert metric(server,
                  'strata_dbpool_connections{database="postgres",user="postgres",state="idle"}') == 1
    with connect(server) as conn:
        assert conn.execute("select 1").fetchone()[0] == 1


def test_bad_clients_get_errors_and_harm_no_one(pooler):
    server = pooler()
    with pytest.raises(psycopg.OperationalError, match="not served by this pooler"):
        connect(server, user="mallory")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(server, password="wrong")
    with socket.create_connection(("127.0.0.1", server.dbpool_port), timeout=5) as sock:
        sock.sendall(struct.pack("!ii", 8, 1234) + b"garbage")
        answer = sock.recv(1024)
        assert answer[:1] == b"E" and b"unsupported protocol" in answer
    with pytest.raises(psycopg.OperationalError):
        connect(server, dbname="no_such_database")
    with connect(server) as conn:
        assert conn.execute("select 1").fetchone()[0] == 1


def closed_by_peer(sock):
    """Whether the other end has closed `sock` (reads what it said before closing)."""
    said = b""
    try:
        while chunk := sock.recv(4096):
            said += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return said


def test_clients_that_do_not_log_in_in_time_are_closed(pooler):
    server = pooler('client_login_timeout = "1s"\n')
    silent = socket.create_connection(("127.0.0.1", server.dbpool_port), timeout=10)
    # A client that sends its startup packet but never answers the password request.
    halfway = socket.create_connection(("127.0.0.1", server.dbpool_port), timeout=10)
    params = b"user\0postgres\0database\0postgres\0\0"
    halfway.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    with silent, halfway:
        # A client that logs in meanwhile is served, and keeps its session past the timeout.
        with connect(server) as conn:
            assert closed_by_peer(silent) == b""
            said = closed_by_peer(halfway)
            assert said is not None and b"client_login_timeout" in said, said
            assert conn.execute("select 1").fetchone()[0] == 1
    assert metric(server, 'strata_dbpool_events_total{event="login_timeout"}') == 2


def test_out_of_file_descriptors_the_pooler_backs_off_and_recovers(pooler):
    """Idle sockets use up the process's file descriptors: accepts fail, logged at most once
    a second, and once the idle ones are closed at client_login_timeout, a real client gets
    in."""
    server = pooler('client_login_timeout = "2s"\n')
    subprocess.run(["prlimit", "--nofile=128:128", "--pid", str(server.process.pid)], check=True)
    idle = [socket.create_connection(("127.0.0.1", server.dbpool_port)) for _ in range(300)]
    try:
        assert wait_until(lambda: "accept failed" in server.log(), timeout=10)
        with connect(server, connect_timeout=30) as conn:
            assert conn.execute("select 1").fetchone()[0] == 1
    finally:
        for sock in idle:
            sock.close()
    # One line a second at most, each with how many failures it stands for.
    times = [datetime.datetime.fromisoformat(line.split()[0].rstrip("Z")).timestamp()
             for line in server.log().splitlines() if "accept failed" in line]
    assert 1 <= len(times) <= times[-1] - times[0] + 1.5, times
    assert all(b - a >= 0.99 for a, b in zip(times, times[1:])), times
    assert server.process.poll() is None


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_answers_a_client_never_read_do_not_reach_the_next_client(pooler, mode):
    server = pooler(f'pool_mode = "{mode}"\npool_size = 1\nauth = "trust"\n')
    with raw_session(server) as sock:
        query = b"select pg_sleep(0.3), 'left over'\0"
        sock.sendall(b"Q" + struct.pack("!i", 4 + len(query)) + query + b"X\0\0\0\x04")
    with connect(server) as conn:
        assert conn.execute("select 42").fetchone()[0] == 42
        assert conn.execute("select 'clean'").fetchone()[0] == "clean"


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_cancel_requests_reach_the_clients_server_connection(pooler, mode):
    # Two threads of the pooler's own: the cancel request may land on the other one.
    server = pooler(f'pool_mode = "{mode}"\nthreads = 2\n')
    with connect(server) as conn:
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(10)")
        assert time.monotonic() - started < 5
        conn.rollback()
        assert conn.execute("select 1").fetchone()[0] == 1


def test_unix_socket_clients(pooler, tmp_path):
    server = pooler(f'unix_socket_dir = "{tmp_path}"\n')
    with connect(server, host=str(tmp_path)) as conn:
        assert conn.execute("select 7").fetchone()[0] == 7


def pool_state(server):
    return server.status()["dbpool"]["databases"][0]


def test_prepared_statements_follow_clients_across_server_connections(pooler, postgres):
    server = pooler('pool_size = 2\n')
    # prepare_threshold=0: psycopg prepares every statement (protocol-level Parse with a name)
    # and binds parameters on the server; autocommit makes each statement its own transaction,
    # so the server connection changes hands between them.
    clients = [connect(server, prepare_threshold=0, autocommit=True) for _ in range(6)]
    for round_ in range(8):
        for index, conn in enumerate(clients):
            assert conn.execute("select %s::int + %s::int", (index, round_)).fetchone()[0] \
                == index + round_
            assert conn.execute("select %s::text || 'x'", (str(index),)).fetchone()[0] \
                == f"{index}x"
    names = {row[0] for row in clients[0].execute(
        "select name from pg_prepared_statements").fetchall()}
    assert names and all(name.startswith("strata_") for name in names), names
    # A client that drops every statement (psycopg forgets its own too) carries on.
    clients[1].execute("deallocate all")
    assert clients[1].execute("select %s::int + %s::int", (40, 2)).fetchone()[0] == 42
    # psycopg closes statements it evicts (protocol Close): the client forgets them, the
    # server connections keep them for other clients.
    clients[2].prepared_max = 2
    for n in range(6):
        assert clients[2].execute(f"select {n} + %s::int", (1,)).fetchone()[0] == n + 1
    for conn in clients:
        conn.close()
    assert metric(server, "strata_dbpool_prepared_statements") >= 8
    assert metric(server, 'strata_dbpool_events_total{event="pinned"}') == 0


@pytest.mark.parametrize("protocol", ["simple", "extended", "prepared"])
def test_pgbench_through_transaction_pooling(pooler, postgres, protocol):
    server = pooler('pool_size = 2\n')
    env = {"PGPASSWORD": PG_PASSWORD, "PATH": "/usr/bin:/bin"}
    target = ["-h", "127.0.0.1", "-U", "postgres"]
    pgbench = str(postgres.bin / "pgbench")
    subprocess.run([pgbench, "-i", "-q", "-s", "1", *target, "-p", str(postgres.port),
                    "postgres"], env=env, check=True, capture_output=True, timeout=120)
    result = subprocess.run(
        [pgbench, "-M", protocol, "-c", "6", "-j", "2", "-t", "40", *target,
         "-p", str(server.dbpool_port), "postgres"],
        env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "number of transactions actually processed: 240/240" in result.stdout
    assert "number of failed transactions: 0" in result.stdout
    assert metric(server, 'strata_dbpool_events_total{event="opened"}') <= 2


def test_tracked_parameters_follow_each_client(pooler):
    server = pooler('pool_size = 1\n')
    with connect(server, autocommit=True) as tokyo, \
            connect(server, autocommit=True, application_name="reports") as other:
        tokyo.execute("set time zone 'Asia/Tokyo'")
        for _ in range(3):
            assert tokyo.execute("show timezone").fetchone()[0] == "Asia/Tokyo"
            assert other.execute("show timezone").fetchone()[0] != "Asia/Tokyo"
            assert other.execute("show application_name").fetchone()[0] == "reports"
            assert tokyo.execute("show application_name").fetchone()[0] == ""
        assert tokyo.info.parameter_status("TimeZone") == "Asia/Tokyo"
        assert other.info.parameter_status("TimeZone") != "Asia/Tokyo"
    assert metric(server, 'strata_dbpool_events_total{event="pinned"}') == 0


# What client A leaves behind on its server connection, and the parameter name PostgreSQL
# reports it under. default_transaction_read_only is reported (PostgreSQL 14 on), not tracked.
LEFT_BEHIND = [("client_encoding", "set client_encoding = 'LATIN1'"),
               ("DateStyle", "set datestyle = 'German, YMD'"),
               ("IntervalStyle", "set intervalstyle = 'sql_standard'"),
               ("TimeZone", "set time zone 'America/Chicago'"),
               ("application_name", "set application_name = 'client-a'"),
               ("standard_conforming_strings", "set standard_conforming_strings = off"),
               ("default_transaction_read_only", "set default_transaction_read_only = on")]


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_new_client_is_told_its_own_session_not_the_previous_clients(pooler, mode):
    """Client A changes every reported parameter and leaves; client B, on the same backend,
    is told at login (and after every change) exactly what `SHOW` gives it."""
    server = pooler(f'pool_mode = "{mode}"\npool_size = 1\n')
    with connect(server, autocommit=True) as a:
        a_pid = a.execute("select pg_backend_pid()").fetchone()[0]
        for name, sql in LEFT_BEHIND:
            a.execute(sql)
            assert a.info.parameter_status(name) == a.execute(f"show {name}").fetchone()[0]
        assert a.info.parameter_status("TimeZone") == "America/Chicago"
    with connect(server, autocommit=True) as b:
        assert b.execute("select pg_backend_pid()").fetchone()[0] == a_pid
        for name, _ in LEFT_BEHIND:
            shown = b.execute(f"show {name}").fetchone()[0]
            assert b.info.parameter_status(name) == shown, name
        assert b.info.parameter_status("TimeZone") != "America/Chicago"
        assert b.info.parameter_status("DateStyle") == "ISO, MDY"
        assert b.info.parameter_status("standard_conforming_strings") == "on"
        # A change of B's own is reported as it happens, and is what SHOW gives.
        b.execute("set time zone 'Asia/Tokyo'")
        assert b.info.parameter_status("TimeZone") == "Asia/Tokyo"
        assert b.execute("show timezone").fetchone()[0] == "Asia/Tokyo"
    # B asks for its own values at startup: it is told them, and the server has them.
    with connect(server, autocommit=True, application_name="client-b") as c:
        assert c.info.parameter_status("application_name") == "client-b"
        assert c.execute("show application_name").fetchone()[0] == "client-b"
        for name, _ in LEFT_BEHIND:
            assert c.info.parameter_status(name) == c.execute(f"show {name}").fetchone()[0]


def test_session_state_pins_the_client_to_its_server_connection(pooler):
    server = pooler('pool_size = 2\n')
    with connect(server, autocommit=True) as pinned, connect(server, autocommit=True) as other:
        pinned.execute("set search_path = pg_catalog, public")
        pid = pinned.execute("select pg_backend_pid()").fetchone()[0]
        pinned.execute("listen jobs")
        for _ in range(5):
            other.execute("select 1")
            assert pinned.execute("select pg_backend_pid()").fetchone()[0] == pid
            assert pinned.execute("show search_path").fetchone()[0] == "pg_catalog, public"
        other.execute("notify jobs, 'hello'")
        notes = list(pinned.notifies(timeout=5, stop_after=1))
        assert [n.payload for n in notes] == ["hello"]
    assert metric(server, 'strata_dbpool_events_total{event="pinned"}') == 1
    # Once the pinned client leaves, its connection is reset before anyone else gets it.
    with connect(server, autocommit=True) as conn:
        for _ in range(4):
            assert conn.execute("show search_path").fetchone()[0] == '"$user", public'


def test_session_state_can_be_reported_instead(pooler):
    server = pooler('pool_size = 2\non_session_state = "report"\n')
    with connect(server, autocommit=True) as conn:
        conn.execute("set work_mem = '8MB'")
        conn.execute("select 1")
    assert metric(server, 'strata_dbpool_events_total{event="session_state"}') == 1
    assert metric(server, 'strata_dbpool_events_total{event="pinned"}') == 0
    assert "left session state" in server.log()


def test_unsupported_startup_parameters_are_refused_clearly(pooler):
    server = pooler()
    with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter: options"):
        connect(server, options="-c search_path=elsewhere")
    with connect(server) as conn:  # ignored by default, as JDBC sends it
        assert conn.execute("select 1").fetchone()[0] == 1


def test_pause_holds_clients_until_resume(pooler):
    server = pooler('pool_size = 2\nquery_wait_timeout = "10s"\n')
    admin = f"http://127.0.0.1:{server.admin_port}"
    with connect(server, autocommit=True) as conn:
        conn.execute("select 1")
        assert pool_state(server)["idle"] == 1
        paused = requests.post(f"{admin}/dbpool/pause?database=postgres", timeout=10)
        assert paused.json() == {"paused": ["postgres"]}
        assert pool_state(server)["paused"] is True and pool_state(server)["idle"] == 0
        answers = []
        thread = threading.Thread(
            target=lambda: answers.append(conn.execute("select 5").fetchone()[0]))
        thread.start()
        assert wait_until(lambda: pool_state(server)["waiting"] == 1)
        time.sleep(0.3)
        assert answers == []
        resumed = requests.post(f"{admin}/dbpool/resume", timeout=10)
        assert resumed.json() == {"resumed": ["postgres"]}
        thread.join(5)
        assert answers == [5]
    assert requests.get(f"{admin}/dbpool/pause", timeout=10).status_code == 405


def test_min_idle_warm_connections_and_idle_timeout(pooler):
    server = pooler('min_idle = 2\ndatabases = ["postgres"]\nidle_timeout = "1s"\n')
    assert wait_until(lambda: pool_state(server)["idle"] == 2)
    clients = [connect(server) for _ in range(4)]
    for conn in clients:
        conn.execute("select 1")  # each holds a transaction open: four connections
    assert pool_state(server)["active"] == 4
    for conn in clients:
        conn.close()
    # While they are busy, min_idle opens spare ones; all come back idle, and those beyond
    # min_idle are closed once unused for idle_timeout.
    assert wait_until(lambda: pool_state(server)["idle"] >= 4, timeout=5)
    assert wait_until(lambda: pool_state(server)["idle"] == 2, timeout=10)
    assert metric(server, 'strata_dbpool_events_total{event="expired"}') >= 2
    time.sleep(1.5)
    assert pool_state(server)["idle"] == 2


def test_server_lifetime_replaces_old_connections(pooler):
    server = pooler('pool_size = 1\nserver_lifetime = "1s"\n')
    with connect(server, autocommit=True) as conn:
        first = conn.execute("select pg_backend_pid()").fetchone()[0]
        time.sleep(1.2)
        assert conn.execute("select pg_backend_pid()").fetchone()[0] != first
    assert metric(server, 'strata_dbpool_events_total{event="expired"}') >= 1


def test_the_reserve_serves_clients_that_waited_long(pooler):
    server = pooler('pool_size = 1\nreserve_pool_size = 1\nreserve_pool_timeout = "300ms"\n'
                    'query_wait_timeout = "5s"\n')
    with connect(server) as holder, connect(server) as late:
        holder.execute("select 1")  # holds the only connection in an open transaction
        started = time.monotonic()
        assert late.execute("select 2").fetchone()[0] == 2
        assert 0.25 < time.monotonic() - started < 3
    assert metric(server, 'strata_dbpool_events_total{event="reserve"}') == 1


def test_the_pool_recovers_when_postgres_restarts_under_load(pooler):
    own = Postgres()
    try:
        server = pooler('pool_size = 3\n', server=own)
        stop = threading.Event()
        outcomes = {"ok": 0, "errors": 0, "ok_after": 0}
        restarted = threading.Event()

        def load():
            while not stop.is_set():
                try:
                    with connect(server, autocommit=True, connect_timeout=3) as conn:
                        while not stop.is_set():
                            conn.execute("select count(*) from pg_class")
                            outcomes["ok_after" if restarted.is_set() else "ok"] += 1
                except psycopg.Error:
                    outcomes["errors"] += 1
                    time.sleep(0.05)

        threads = [threading.Thread(target=load) for _ in range(5)]
        for thread in threads:
            thread.start()
        assert wait_until(lambda: outcomes["ok"] >= 50)
        own.restart()
        restarted.set()
        assert wait_until(lambda: outcomes["ok_after"] >= 50, timeout=30), outcomes
        stop.set()
        for thread in threads:
            thread.join(10)
        assert outcomes["ok"] > 0 and outcomes["errors"] > 0, outcomes
        assert outcomes["ok_after"] > 0, outcomes
        with connect(server) as conn:
            assert conn.execute("select 1").fetchone()[0] == 1
        assert server.process.poll() is None
    finally:
        own.stop()


def test_the_example_sites_own_tests_pass_through_transaction_pooling(pooler):
    server = pooler('pool_size = 4\n')
    env = {**os.environ, "EXAMPLE_PG_PORT": str(server.dbpool_port), "EXAMPLE_PG_NAME": "postgres",
           "EXAMPLE_PG_PASSWORD": PG_PASSWORD}
    # Django creates its test database and drops it at the end, through the pooler, which
    # closes its own idle connections to it first.
    result = subprocess.run([sys.executable, "manage.py", "test", "blog", "-v", "2"],
                            cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Ran 6 tests" in result.stderr and "OK" in result.stderr
    assert "Destroying test database" in result.stderr
    assert metric(server, 'strata_dbpool_events_total{event="lent"}') > 20


def test_make_run_serves_the_example_on_a_private_postgres_through_the_pooler(tmp_path):
    var = Path(tempfile.mkdtemp(prefix="strata-var-"))
    ports = {name: free_port() for name in ("http", "admin", "pg", "pooler")}
    env = {**os.environ, "EXAMPLE_VAR": str(var), "EXAMPLE_PG_SERVER_PORT": str(ports["pg"]),
           "EXAMPLE_POOLER_PORT": str(ports["pooler"])}
    env = {k: v for k, v in env.items() if not k.startswith("STRATA_")}
    env["EXAMPLE_STRATA_BIN"] = str(STRATA)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    log = open(tmp_path / "run.log", "w")
    script = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "run-example.sh"), "--bind",
         f"127.0.0.1:{ports['http']}", "--admin", f"127.0.0.1:{ports['admin']}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    admin = f"http://127.0.0.1:{ports['admin']}"
    try:
        # The admin listener opens last, once every tier is up.
        assert wait_for_port(ports["admin"], 120, script), (tmp_path / "run.log").read_text()
        front = requests.get(f"http://127.0.0.1:{ports['http']}/", timeout=10)
        assert front.status_code == 200 and "<h1" in front.text
        status = requests.get(f"{admin}/status", timeout=10).json()
        assert status["dbpool"]["databases"][0]["database"] == "example"
        assert "through Strata's pooler" in (tmp_path / "run.log").read_text()
        assert (var / "postgres" / "PG_VERSION").exists()
    finally:
        os.killpg(script.pid, signal.SIGTERM)
        script.wait(60)
        shutil.rmtree(var, ignore_errors=True)
    # The script stops the private PostgreSQL when Strata stops.
    assert not wait_for_port(ports["pg"], 1)


def test_health_checks_see_postgres_go_down_and_come_back(pooler):
    own = Postgres()
    try:
        server = pooler('health_check_interval = "200ms"\n', server=own)

        def health():
            return server.status()["dbpool"]["server"]

        def ready():
            return server.admin("/readyz")

        assert wait_until(lambda: health()["up"] is True)
        assert ready().status_code == 200
        with connect(server, autocommit=True) as conn:
            conn.execute("select 1")
        assert pool_state(server)["idle"] == 1
        own.halt()
        assert wait_until(lambda: health()["up"] is False)
        assert health()["error"]
        assert pool_state(server)["idle"] == 0
        assert metric(server, "strata_dbpool_server_up") == 0
        # Not ready while PostgreSQL is away, and /readyz says why.
        assert ready().status_code == 503 and "dbpool: PostgreSQL unreachable" in ready().text
        with pytest.raises(psycopg.OperationalError, match="cannot reach PostgreSQL"):
            connect(server, dbname="template1")
        own.start()
        assert wait_until(lambda: health()["up"] is True)
        assert ready().status_code == 200
        assert metric(server, "strata_dbpool_server_up") == 1
        assert metric(server, 'strata_dbpool_health_checks_total{outcome="failed"}') >= 1
        with connect(server) as conn:
            assert conn.execute("select 1").fetchone()[0] == 1
    finally:
        own.stop()


# The database-heavy labels of Django's own suite that shared/TESTING.md lists.
DJANGO_LABELS = ["backends", "basic", "transactions", "queries", "select_for_update",
                 "get_or_create", "update", "bulk_create", "aggregation", "expressions",
                 "model_fields", "db_functions", "migrations.test_operations", "postgres_tests"]


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_djangos_own_database_tests_pass_through_the_pooler(pooler, django_tests, mode):
    """A database-heavy part of Django's own test suite (from the installed Django's sdist)
    with PostgreSQL reached through the pooler. Session mode must pass as PostgreSQL itself
    does; transaction mode runs with server-side cursors off, as Django's documentation asks
    for transaction pooling, and only the tests of server-side cursors themselves may fail."""
    server = pooler(f'pool_mode = "{mode}"\npool_size = 6\n')
    transaction = mode == "transaction"
    database = ("{'ENGINE': 'django.db.backends.postgresql', 'HOST': '127.0.0.1', "
                f"'PORT': {server.dbpool_port}, 'USER': 'postgres', 'PASSWORD': '{PG_PASSWORD}', "
                f"'DISABLE_SERVER_SIDE_CURSORS': {transaction}, 'NAME': ")
    (django_tests / f"strata_pg_{mode}.py").write_text(
        "from test_sqlite import *  # noqa\n"
        f"DATABASES = {{'default': {database}'django_main'}},\n"
        f"             'other': {database}'django_other'}}}}\n")
    result = subprocess.run(
        [sys.executable, "runtests.py", f"--settings=strata_pg_{mode}", "--parallel=1",
         "--keepdb", *DJANGO_LABELS],
        cwd=django_tests, capture_output=True, text=True, timeout=900)
    output = result.stderr
    ran = re.search(r"Ran (\d+) tests", output)
    assert ran and int(ran.group(1)) >= 3000, output[-3000:]
    failed = re.findall(r"^(?:FAIL|ERROR): (\S+) \(([\w.]+)\)", output, re.M)
    if transaction:
        others = [f"{test} ({where})" for test, where in failed
                  if ".test_server_side_cursors." not in where]
        assert others == [], output[-6000:]
    else:
        assert result.returncode == 0 and failed == [], output[-6000:]
        assert "\nOK" in output, output[-3000:]
    # Three databases (the two test databases, and postgres to create them), 6 each at most.
    assert metric(server, 'strata_dbpool_events_total{event="opened"}') <= 18


def test_a_client_asking_for_protocol_3_2_is_told_3_0(pooler):
    server = pooler()
    with connect(server, max_protocol_version="3.2") as conn:
        assert conn.pgconn.protocol_version == 3
        assert conn.execute("select 1").fetchone()[0] == 1


def test_truncated_and_oversized_messages_harm_no_one(pooler):
    server = pooler('auth = "trust"\n')
    with raw_session(server) as sock:
        # A query whose length claims far more than the pooler accepts.
        sock.sendall(b"Q" + struct.pack("!i", 0x7fffffff) + b"select 1")
        answer = sock.recv(4096)
        assert answer[:1] == b"E" and b"too large" in answer
    with raw_session(server) as sock:
        sock.sendall(b"Q" + struct.pack("!i", 100) + b"select")  # then the client vanishes
    with connect(server) as conn:
        assert conn.execute("select 3").fetchone()[0] == 3


def test_a_login_message_claiming_megabytes_costs_nothing(pooler):
    """Before login a password or SASL message is at most 64 KiB (PostgreSQL's own limit): one
    whose length claims 60 MiB is refused at once, and nothing is allocated ahead of the bytes
    that came (20 such clients once cost the pooler 1.2 GB)."""
    server = pooler()
    before = resident_kb(server.process.pid)
    params = b"user\0postgres\0database\0postgres\0\0"
    clients = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", server.dbpool_port), timeout=10)
        sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
        assert sock.recv(4096)[:1] == b"R", "asked to authenticate"
        sock.sendall(b"p" + struct.pack("!i", 60 << 20) + b"0123456789")
        clients.append(sock)
    for sock in clients:
        said = closed_by_peer(sock)
        assert said is not None and b"too large" in said, said
        sock.close()
    assert resident_kb(server.process.pid) - before < 100_000
    with connect(server) as conn:
        assert conn.execute("select 4").fetchone()[0] == 4


def test_tls_towards_clients(pooler, test_ca):
    server = pooler(f'tls_cert_file = "{test_ca["cert"]}"\ntls_key_file = "{test_ca["key"]}"\n')
    with connect(server, sslmode="verify-full", sslrootcert=str(test_ca["ca"])) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 'secret'").fetchone()[0] == "secret"
    with connect(server, host="localhost", sslmode="verify-full",
                 sslrootcert=str(test_ca["ca"])) as conn:
        assert conn.pgconn.ssl_in_use
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        connect(server, sslmode="verify-full", sslrootcert=str(test_ca["other_ca"]))
    with connect(server, sslmode="disable") as conn:  # TLS is offered, not required
        assert not conn.pgconn.ssl_in_use


def test_tls_can_be_required_and_is_refused_when_not_configured(pooler, test_ca):
    required = pooler(f'tls_cert_file = "{test_ca["cert"]}"\n'
                      f'tls_key_file = "{test_ca["key"]}"\ntls_required = true\n')
    with pytest.raises(psycopg.OperationalError, match="requires TLS"):
        connect(required, sslmode="disable")
    with connect(required, sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use
    plain = pooler()
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        connect(plain, sslmode="require")


def test_several_roles_each_with_their_own_pool(pooler, postgres):
    with psycopg.connect(host="127.0.0.1", port=postgres.port, user="postgres",
                         password=PG_PASSWORD, dbname="postgres", autocommit=True) as admin:
        admin.execute("drop role if exists reporter")
        admin.execute("create role reporter login password 'reporter-pw'")
    for auth in ("scram-sha-256", "md5"):
        server = pooler(f'auth = "{auth}"\npool_size = 2\n'
                        '[[dbpool.users]]\nname = "reporter"\npassword = "reporter-pw"\n')
        with connect(server, user="reporter", password="reporter-pw") as conn:
            assert conn.execute("select current_user").fetchone()[0] == "reporter"
        with connect(server) as conn:
            assert conn.execute("select current_user").fetchone()[0] == "postgres"
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            connect(server, user="reporter", password=PG_PASSWORD)
        pools = {(p["database"], p["user"]) for p in server.status()["dbpool"]["databases"]}
        assert pools == {("postgres", "reporter"), ("postgres", "postgres")}


def test_roles_looked_up_in_postgres_log_in_without_the_pooler_knowing_passwords(pooler,
                                                                                   postgres):
    with psycopg.connect(host="127.0.0.1", port=postgres.port, user="postgres",
                         password=PG_PASSWORD, dbname="postgres", autocommit=True) as admin:
        for role in ("looked_scram", "looked_md5"):
            admin.execute(f"drop role if exists {role}")
        admin.execute("set password_encryption = 'scram-sha-256'")
        admin.execute("create role looked_scram login password 'scram-pw'")
        admin.execute("set password_encryption = 'md5'")
        admin.execute("create role looked_md5 login password 'md5-pw'")
        # PostgreSQL's scram-sha-256 method refuses md5-stored passwords; md5 takes both.
        hba = postgres.data / "pg_hba.conf"
        line = "host all looked_md5 127.0.0.1/32 md5\n"
        if line not in hba.read_text():
            hba.write_text(line + hba.read_text())
        admin.execute("select pg_reload_conf()")
    query = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1"
    server = pooler(f'auth_query = "{query}"\npool_size = 2\n')
    for role, password in (("looked_scram", "scram-pw"), ("looked_md5", "md5-pw")):
        with connect(server, user=role, password=password) as conn:
            assert conn.execute("select current_user").fetchone()[0] == role
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            connect(server, user=role, password="guess")
        # Later server connections log in with what the proof gave: two clients, each in a
        # transaction, need a second server connection.
        first, second = connect(server, user=role, password=password), \
            connect(server, user=role, password=password)
        with first, second:
            pids = {conn.execute("select pg_backend_pid()").fetchone()[0]
                    for conn in (first, second)}
            assert len(pids) == 2
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(server, user="nobody_at_all", password="x")
    # A password changed in PostgreSQL counts at the next login.
    with connect(server, autocommit=True) as admin:
        admin.execute("alter role looked_scram password 'changed-pw'")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(server, user="looked_scram", password="scram-pw")
    with connect(server, user="looked_scram", password="changed-pw") as conn:
        assert conn.execute("select 1").fetchone()[0] == 1
    # The configured role still logs in with its own password.
    with connect(server) as conn:
        assert conn.execute("select current_user").fetchone()[0] == "postgres"


def test_a_role_lookup_with_postgres_down_is_a_clear_error(pooler):
    server = pooler('auth_query = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1"\n'
                    'health_check_interval = "0s"\n',
                    server=types.SimpleNamespace(port=free_port()))
    with pytest.raises(psycopg.OperationalError, match="could not look role"):
        connect(server, user="someone", password="x")
    assert server.status()["dbpool"]["server"] is not None


def test_a_database_with_idle_pooled_connections_can_be_dropped(pooler):
    server = pooler()
    with connect(server, autocommit=True) as admin:
        admin.execute("drop database if exists scratch_db")
        admin.execute("create database scratch_db")
        with connect(server, dbname="scratch_db", autocommit=True) as user:
            user.execute("create table t (x int)")
        assert any(p["database"] == "scratch_db" and p["idle"] == 1
                   for p in server.status()["dbpool"]["databases"])
        admin.execute("drop database scratch_db")
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        connect(server, dbname="scratch_db")


def test_a_terminated_server_connection_reaches_its_client_as_a_broken_connection(pooler, postgres):
    server = pooler()
    with connect(server) as victim:
        pid = victim.execute("select pg_backend_pid()").fetchone()[0]  # holds it: in a transaction
        with psycopg.connect(host="127.0.0.1", port=postgres.port, user="postgres",
                             password=PG_PASSWORD, dbname="postgres", autocommit=True) as admin:
            admin.execute("select pg_terminate_backend(%s)", (pid,))
            assert wait_until(lambda: admin.execute(
                "select count(*) from pg_stat_activity where pid = %s", (pid,)).fetchone()[0] == 0)
        for _ in range(2):  # the server's error, then a closed connection
            with pytest.raises(psycopg.OperationalError):
                victim.execute("select 1")
    with connect(server) as conn:
        assert conn.execute("select 1").fetchone()[0] == 1


def test_the_pooler_reaches_postgres_over_tls_with_verify_full(pooler, test_ca):
    """A PostgreSQL that takes TLS connections only (`hostnossl ... reject`): with
    `server_sslmode = "verify-full"` and its CA the pooler logs in over TLS (pg_stat_ssl says
    so), its health checks too; against another CA it refuses the server, a clean error."""
    own = Postgres()
    try:
        for name in ("cert", "key"):
            target = own.data / f"server.{name}"
            shutil.copy(test_ca[name], target)
            target.chmod(0o600)
            if os.geteuid() == 0:
                shutil.chown(target, "postgres", "postgres")
        (own.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n"
            "hostnossl all all 127.0.0.1/32 reject\n")
        with open(own.data / "postgresql.conf", "a") as conf:
            conf.write("ssl = on\nssl_cert_file = 'server.cert'\nssl_key_file = 'server.key'\n")
        own.restart()
        tls = ('server_sslmode = "verify-full"\n'
               "[dbpool.server_tls]\n"
               f'ca_file = "{test_ca["ca"]}"\n')
        server = pooler(tls, server=own)
        with connect(server) as conn:
            ssl = conn.execute(
                "select ssl, version from pg_stat_ssl where pid = pg_backend_pid()").fetchone()
            assert ssl[0] is True and ssl[1].startswith("TLS"), ssl
        assert wait_until(lambda: server.status()["dbpool"]["server"]["up"] is True)
        # Without TLS the same server refuses the pooler; with another CA the pooler refuses it.
        plain = pooler("", server=own)
        with pytest.raises(psycopg.OperationalError):
            connect(plain).close()
        wrong = pooler(tls.replace(str(test_ca["ca"]), str(test_ca["other_ca"])), server=own)
        with pytest.raises(psycopg.OperationalError) as refused:
            connect(wrong).close()
        assert "invalid peer certificate: UnknownIssuer" in str(refused.value), refused.value
    finally:
        own.stop()

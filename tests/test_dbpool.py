"""The PostgreSQL pooler against a real PostgreSQL started by the test harness, driven by
psycopg."""

import socket
import struct
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from conftest import PG_PASSWORD, free_port, metric, wait_until


@pytest.fixture
def pooler(strata, postgres):
    """Starts a node running only the pooler, in front of the test PostgreSQL."""

    def start(extra=""):
        port = free_port()
        config = ("[dbpool]\n"
                  f'bind = "127.0.0.1:{port}"\n'
                  f'server = "127.0.0.1:{postgres.port}"\n'
                  f'server_user = "postgres"\nserver_password = "{PG_PASSWORD}"\n' + extra)
        server = strata("--tiers", "dbpool", config=config)
        server.dbpool_port = port
        return server

    return start


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


def test_transaction_mode_shares_few_server_connections_among_many_clients(pooler):
    server = pooler('pool_size = 2\n')
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
        assert pool_state() == {"database": "postgres", "active": 1, "idle": 0, "waiting": 0,
                                "paused": False}
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
    assert wait_until(lambda: pool_state() == {"database": "postgres", "active": 0, "idle": 1,
                                               "waiting": 0, "paused": False})
    assert metric(server, 'strata_dbpool_connections{database="postgres",state="idle"}') == 1
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


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_answers_a_client_never_read_do_not_reach_the_next_client(pooler, mode):
    server = pooler(f'pool_mode = "{mode}"\npool_size = 1\nauth = "trust"\n')
    params = b"user\0postgres\0database\0postgres\0\0"
    with socket.create_connection(("127.0.0.1", server.dbpool_port), timeout=10) as sock:
        sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
        greeting = b""
        while not greeting.endswith(b"Z\0\0\0\x05I"):
            greeting += sock.recv(4096)
        query = b"select pg_sleep(0.3), 'left over'\0"
        sock.sendall(b"Q" + struct.pack("!i", 4 + len(query)) + query + b"X\0\0\0\x04")
    with connect(server) as conn:
        assert conn.execute("select 42").fetchone()[0] == 42
        assert conn.execute("select 'clean'").fetchone()[0] == "clean"


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_cancel_requests_reach_the_clients_server_connection(pooler, mode):
    server = pooler(f'pool_mode = "{mode}"\n')
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

"""Fixtures that run the real `strata` binary against real applications.

Every test starts its own server on free ports and stops it afterwards; the log of a server
is printed when its test fails.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "tests" / "apps"
EXAMPLE = ROOT / "example"
VENV = Path(sys.prefix)
STRATA = Path(os.environ.get("STRATA_BIN", ROOT / "target" / "debug" / "strata"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid):
    """Process ids whose parent is `pid` (whichever thread of it started them)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def exchange(port, raw, piece=None):
    """Sends `raw` bytes (in writes of `piece` bytes when given) and returns everything the
    server answers until it closes (a reset, as when it closes with the request unread, ends
    the answer too)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        piece = piece or len(raw) or 1
        try:
            for at in range(0, len(raw), piece):
                sock.sendall(raw[at:at + piece])
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    return data


def wait_for_port(port, timeout, process=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def metric(server, name):
    """The value of one sample on the server's `/metrics` page (0 when absent)."""
    for line in server.admin("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def wait_until(predicate, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def strata_run(bind, admin, cache, args, config=None, config_path=None, env=None):
    """The command line and environment of a `strata run` listening on these addresses,
    with `config` (TOML text) written to `config_path` if given; the caller's own `STRATA_*`
    variables are left out, `env` added."""
    command = [str(STRATA), "run", "--bind", bind, "--admin", admin]
    if config is not None:
        config_path.write_text(config)
        command += ["--config", str(config_path)]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    full_env["STRATA_CACHE__BIND"] = cache
    full_env.update(env or {})
    return command + list(args), full_env


class Strata:
    """One running `strata run`."""

    def __init__(self, tmp_path, args, env=None, config=None, wait=True, cwd=None):
        self.port = free_port()
        self.admin_port = free_port()
        self.cache_port = free_port()
        self.log_path = tmp_path / f"strata-{self.port}.log"
        command, full_env = strata_run(
            f"127.0.0.1:{self.port}", f"127.0.0.1:{self.admin_port}",
            f"127.0.0.1:{self.cache_port}", args, config=config,
            config_path=tmp_path / f"strata-{self.port}.toml", env=env)
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            command, stdout=self.log_file, stderr=subprocess.STDOUT, env=full_env,
            cwd=cwd or tmp_path,
        )
        # The admin listener listens last, once every tier (and the HTTP listener) is up.
        if wait and not wait_for_port(self.admin_port, 60, self.process):
            raise AssertionError(f"strata did not start:\n{self.log()}")

    def url(self, path="/"):
        return f"http://127.0.0.1:{self.port}{path}"

    def admin(self, path):
        return requests.get(f"http://127.0.0.1:{self.admin_port}{path}", timeout=10)

    def status(self):
        return self.admin("/status").json()

    def worker_pids(self):
        return sorted(w["pid"] for w in self.status()["app"]["workers"])

    def wait_busy(self, workers=1, queued=0):
        """Waits until `workers` workers hold a request and `queued` requests wait for one
        (a test that needs a request in flight waits for it, not for time)."""
        def reached():
            app = self.status()["app"]
            busy = sum(1 for w in app["workers"] if w["state"] == "busy")
            return busy >= workers and app["queue_length"] >= queued
        assert wait_until(reached), f"never {workers} busy and {queued} queued: {self.status()}"

    def log(self):
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig):
        self.process.send_signal(sig)

    def wait(self, timeout=30):
        return self.process.wait(timeout=timeout)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()


@pytest.fixture
def strata(tmp_path, request):
    """Starts `strata run` with the given arguments; stops every server after the test."""
    started = []

    def start(*args, **kwargs):
        server = Strata(tmp_path, args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for server in started:
            print(f"--- log of strata on port {server.port} ---\n{server.log()}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report


def app(name, *extra, tiers="lb,app"):
    """Arguments that serve `tests/apps/<name>.py` from this interpreter's virtualenv; the app
    server alone behind the listener unless other `tiers` are asked for."""
    return ["--app", name, "--chdir", str(APPS), "--virtualenv", str(VENV),
            "--tiers", tiers, *extra]


@pytest.fixture(scope="session")
def example_db(tmp_path_factory):
    """A migrated copy of the example site's SQLite database."""
    path = tmp_path_factory.mktemp("example") / "db.sqlite3"
    env = dict(os.environ, EXAMPLE_DB=str(path))
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=EXAMPLE, env=env, check=True)
    return path


@pytest.fixture
def example(strata, example_db, tmp_path):
    """Starts the example Django site on a private copy of the database."""

    def start(*extra, env=None, **kwargs):
        db = tmp_path / "db.sqlite3"
        shutil.copy(example_db, db)
        full_env = {"EXAMPLE_DB": str(db), **(env or {})}
        return strata("--app", "mysite.wsgi:application", "--chdir", str(EXAMPLE),
                      "--virtualenv", str(VENV), *extra, env=full_env, **kwargs)

    return start


class Origin:
    """A full stack (listener, accelerator, app server) serving origin.py."""

    def __init__(self, strata, tmp_path, config=None, workers="2"):
        self.log = tmp_path / "origin.log"
        self.down = tmp_path / "origin.down"
        self.log.touch()
        self.server = strata(*app("origin", "--workers", workers, tiers="lb,accelerator,app"),
                             env={"ORIGIN_LOG": str(self.log), "ORIGIN_DOWN": str(self.down)},
                             config=config)

    def get(self, path, **kwargs):
        return requests.get(self.server.url(path), timeout=30, **kwargs)

    def calls(self, path):
        """How many requests for `path` (path and query as sent) the app served."""
        wanted = unquote(path if "?" in path else path + "?")
        return sum(1 for line in self.log.read_text().splitlines()
                   if unquote(line.split(" ", 1)[1]) == wanted)

    def admin_post(self, path):
        return requests.post(f"http://127.0.0.1:{self.server.admin_port}{path}", timeout=30)


@pytest.fixture
def origin(strata, tmp_path):
    return Origin(strata, tmp_path)


def status_of(response):
    """The response's `Cache-Status` ("" when absent)."""
    return response.headers.get("Cache-Status", "")


PG_PASSWORD = "strata-test"


class Postgres:
    """A private PostgreSQL server: initdb into a temporary directory, on a free port,
    password (SCRAM) logins over TCP. Under root it runs as the `postgres` user."""

    def __init__(self):
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        assert bins, "PostgreSQL server binaries are needed (/usr/lib/postgresql/*/bin)"
        self.bin = bins[-1].parent
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="strata-pg-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.data.mkdir()
        self.as_user = []
        if os.geteuid() == 0:
            shutil.chown(self.data, "postgres", "postgres")
            shutil.chown(self.root, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        pwfile = self.root / "pw"
        pwfile.write_text(PG_PASSWORD + "\n")
        pwfile.chmod(0o644)
        self.run("initdb", "-D", str(self.data), "-U", "postgres", "--pwfile", str(pwfile),
                 "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8")
        self.start()

    def start(self):
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "start",
                 "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1")

    def halt(self):
        """Stops the server, keeping its data for `start`."""
        self.run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def run(self, tool, *args):
        subprocess.run([*self.as_user, str(self.bin / tool), *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def restart(self):
        """A fast restart: every connection is terminated, then the server is back."""
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-m", "fast",
                 "-w", "restart",
                 "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1")

    def stop(self):
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m",
                        "fast", "-w", "stop"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory):
    """A throwaway certificate authority and a server certificate it signed for localhost and
    127.0.0.1 (openssl): paths `ca`, `cert`, `key`, plus `other_ca` that signed nothing, and
    two client certificates it signed (`client1`/`client2`: `_cert`, `_key`; CN
    strata-client-1 and -2) for mutual TLS."""
    root = tmp_path_factory.mktemp("tls")

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for name in ("ca", "other_ca"):
        openssl("req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.pem",
                "-days", "2", "-subj", f"/CN=Strata test {name}")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (root / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    made = {"ca": root / "ca.pem", "cert": root / "server.pem", "key": root / "server.key",
            "other_ca": root / "other_ca.pem"}
    (root / "client.cnf").write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    for n in (1, 2):
        openssl("req", *ec, "-keyout", f"client{n}.key", "-out", f"client{n}.csr",
                "-subj", f"/CN=strata-client-{n}")
        openssl("x509", "-req", "-in", f"client{n}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"client{n}.pem", "-days", "2",
                "-extfile", "client.cnf")
        made[f"client{n}_cert"], made[f"client{n}_key"] = root / f"client{n}.pem", root / f"client{n}.key"
    return made


@pytest.fixture(scope="session")
def django_tests(tmp_path_factory):
    """The `tests/` folder of the installed Django's sdist (downloaded once per session): the
    test suite Django runs on itself, for its backends to run against Strata's tiers."""
    import django

    root = tmp_path_factory.mktemp("django-sdist")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--no-binary", ":all:", f"Django=={django.__version__}", "-d", str(root)],
                   check=True, timeout=300)
    archive = next(root.glob("*.tar.gz"))
    subprocess.run(["tar", "xzf", str(archive), "-C", str(root)], check=True)
    return next(root.glob("*/tests"))


@pytest.fixture(scope="session")
def postgres():
    server = Postgres()
    yield server
    server.stop()

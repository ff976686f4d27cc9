"""Binary upgrade: a new master takes the listening sockets over; the old one drains."""

import os
import subprocess

import requests

from conftest import STRATA, app, free_port, wait_until
from test_reload import Load


def test_new_master_takes_over_without_errors(strata, tmp_path):
    upgrade = tmp_path / "upgrade.sock"
    config = f'[admin]\nupgrade_socket = "{upgrade}"\n'
    old = strata(*app("lifecycle", "--workers", "2"), config=config)
    old_pids = set(old.worker_pids())
    load = Load(old.url("/"))
    load.wait_for(20)
    log = open(tmp_path / "new.log", "wb")
    new = subprocess.Popen(
        [str(STRATA), "run", "--bind", f"127.0.0.1:{old.port}", "--admin",
         f"127.0.0.1:{old.admin_port}", "--config", str(tmp_path / f"strata-{old.port}.toml"),
         "--upgrade", *app("lifecycle", "--workers", "2")],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        # The old master drains and exits by itself once the new one serves.
        assert old.wait(timeout=60) == 0, old.log()
        load.wait_for(20)
        results = load.stop()
        assert [r for r in results if r[2] != 200] == []
        served_by = {int(r[3]) for r in results}
        assert served_by & old_pids and served_by - old_pids, "both generations of masters served"
        new_pids = {w["pid"] for w in old.status()["app"]["workers"]}
        assert not new_pids & old_pids
        assert int(requests.get(old.url("/")).text) in new_pids
        assert upgrade.exists(), "the new master offers the next upgrade"
        assert "upgrade: the old master is draining" in (tmp_path / "new.log").read_text()
    finally:
        new.terminate()
        assert new.wait(timeout=30) == 0
        log.close()
    assert not upgrade.exists()


def test_the_https_listener_is_handed_over_too(strata, tmp_path, test_ca):
    upgrade = tmp_path / "upgrade.sock"
    tls_port = free_port()
    config = (f'[admin]\nupgrade_socket = "{upgrade}"\n'
              f'[lb]\ntls_bind = "127.0.0.1:{tls_port}"\n'
              f'tls_cert_file = "{test_ca["cert"]}"\ntls_key_file = "{test_ca["key"]}"\n')
    old = strata(*app("lifecycle"), config=config)
    load = Load(f"https://localhost:{tls_port}/", clients=2, verify=str(test_ca["ca"]))
    load.wait_for(20)
    log = open(tmp_path / "new.log", "wb")
    new = subprocess.Popen(
        [str(STRATA), "run", "--bind", f"127.0.0.1:{old.port}", "--admin",
         f"127.0.0.1:{old.admin_port}", "--config", str(tmp_path / f"strata-{old.port}.toml"),
         "--upgrade", *app("lifecycle")],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        assert old.wait(timeout=60) == 0, old.log()
        load.wait_for(20)
        results = load.stop()
        assert results and [r for r in results if r[2] != 200] == []
        new_pids = {w["pid"] for w in old.status()["app"]["workers"]}
        answer = requests.get(f"https://localhost:{tls_port}/", verify=str(test_ca["ca"]))
        assert int(answer.text) in new_pids
    finally:
        new.terminate()
        assert new.wait(timeout=30) == 0
        log.close()


def test_failed_upgrade_leaves_the_old_master_serving(strata, tmp_path):
    upgrade = tmp_path / "upgrade.sock"
    old = strata(*app("lifecycle"), config=f'[admin]\nupgrade_socket = "{upgrade}"\n')
    result = subprocess.run(
        [str(STRATA), "run", "--bind", f"127.0.0.1:{old.port}", "--admin",
         f"127.0.0.1:{old.admin_port}", "--config", str(tmp_path / f"strata-{old.port}.toml"),
         "--upgrade", *app("broken_import")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode != 0
    assert "module_that_does_not_exist" in result.stderr
    assert wait_until(lambda: "the new master gave up" in old.log())
    assert old.process.poll() is None
    assert requests.get(old.url("/")).status_code == 200
    assert "the new master gave up" in old.log()
    # The offer stands: a later upgrade still works.
    assert upgrade.exists()


def test_upgrade_without_a_running_master_fails_clearly(tmp_path):
    result = subprocess.run(
        [str(STRATA), "run", "--upgrade", *app("lifecycle")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)})
    assert result.returncode != 0
    assert "cannot take the listeners over" in result.stderr


def test_each_node_offers_upgrades_on_a_socket_of_its_own(strata, tmp_path):
    """Two cache-only nodes on one host (no HTTP listener) get upgrade sockets of their own,
    named after their admin listeners; a node configured onto a live node's socket refuses to
    start, with the reason, and takes nothing from it."""
    first = strata("--tiers", "cache")
    second = strata("--tiers", "cache")
    def socket_of(server):
        line = next(line for line in server.log().splitlines() if "upgrade socket ready" in line)
        return line.split("path=")[1].split()[0]
    assert wait_until(lambda: "upgrade socket ready" in first.log()
                      and "upgrade socket ready" in second.log())
    ours = {socket_of(first), socket_of(second)}
    assert len(ours) == 2, ours
    assert all(str(server.admin_port) in socket_of(server) for server in (first, second))
    taken = socket_of(first)
    third = strata("--tiers", "cache", config=f'[admin]\nupgrade_socket = "{taken}"\n',
                   wait=False)
    assert third.wait(timeout=30) != 0
    assert "another Strata master is running with the upgrade socket" in third.log()
    assert os.path.exists(taken)
    assert "upgrade: listeners handed" not in first.log(), "a probe is not an upgrade"
    # The first node is unharmed.
    assert first.status()["tiers"] == ["cache"]

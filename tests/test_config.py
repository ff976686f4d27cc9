"""Configuration layers and `strata check`."""

import subprocess

import requests

from conftest import STRATA, app


def check(tmp_path, text, env=None):
    path = tmp_path / "strata.toml"
    path.write_text(text)
    return subprocess.run([str(STRATA), "check", "--config", str(path)], capture_output=True,
                          text=True, env=env, timeout=30)


def test_check_accepts_the_annotated_example(tmp_path):
    from conftest import ROOT

    result = subprocess.run([str(STRATA), "check", "--config", str(ROOT / "config" / "strata.toml")],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "configuration ok" in result.stdout


def test_check_names_file_key_and_value(tmp_path):
    result = check(tmp_path, '[app]\nworkers = "many"\n')
    assert result.returncode != 0
    assert "workers" in result.stderr and "strata.toml" in result.stderr and "many" in result.stderr
    result = check(tmp_path, "[app]\nworkers = 0\n")
    assert result.returncode != 0 and "app.workers = 0" in result.stderr
    result = check(tmp_path, "[app]\nqueue_length = 10000\n")
    assert result.returncode != 0 and "app.queue_length = 10000" in result.stderr
    result = check(tmp_path, "[app]\nworkerz = 2\n")
    assert result.returncode != 0 and "workerz" in result.stderr
    result = check(tmp_path, '[app]\ntimeout = "soon"\n')
    assert result.returncode != 0 and "soon" in result.stderr
    result = check(tmp_path, 'tiers = ["lb", "squid"]\n')
    assert result.returncode != 0 and "squid" in result.stderr
    result = check(tmp_path, '[admin]\nbind = "0.0.0.0:9000"\n')
    assert result.returncode != 0 and "admin.token" in result.stderr


def test_check_validates_the_pooler_only_where_it_runs(tmp_path):
    pooler = 'tiers = ["dbpool"]\n[dbpool]\nauth = "trust"\n'
    assert check(tmp_path, pooler).returncode == 0
    result = check(tmp_path, pooler + 'pool_mode = "statement"\n')
    assert result.returncode != 0 and "dbpool.pool_mode" in result.stderr
    result = check(tmp_path, pooler + 'tls_cert_file = "/x.pem"\n')
    assert result.returncode != 0 and "tls_key_file" in result.stderr
    result = check(tmp_path, pooler + 'on_session_state = "ignore"\n')
    assert result.returncode != 0 and "on_session_state" in result.stderr
    result = check(tmp_path, pooler + 'auth_query = "select 1"\n')
    assert result.returncode != 0 and "dbpool.auth_query" in result.stderr
    result = check(tmp_path, 'tiers = ["dbpool"]\n')
    assert result.returncode != 0 and "server_password" in result.stderr
    # Not running the pooler, its section is not held against the node.
    assert check(tmp_path, '[dbpool]\npool_mode = "statement"\n').returncode == 0


def test_missing_config_file_is_an_error(tmp_path):
    result = subprocess.run([str(STRATA), "check", "--config", str(tmp_path / "nope.toml")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "nope.toml" in result.stderr


def test_layers_file_then_environment_then_flags(strata):
    config = "[app]\nworkers = 1\nmax_requests = 7\n"
    from_file = strata(*app("hello"), config=config)
    assert len(from_file.status()["app"]["workers"]) == 1
    from_env = strata(*app("hello"), config=config, env={"STRATA_APP__WORKERS": "3"})
    assert len(from_env.status()["app"]["workers"]) == 3
    from_flag = strata(*app("hello", "--workers", "2"), config=config, env={"STRATA_APP__WORKERS": "3"})
    assert len(from_flag.status()["app"]["workers"]) == 2
    assert requests.get(from_flag.url("/")).text == "Hello, World!"


def test_admin_status_and_metrics(strata):
    server = strata(*app("hello", "--workers", "2"))
    for _ in range(5):
        requests.get(server.url("/"))
    requests.get(server.url("/"), headers={"Connection": "close"})
    status = server.status()
    assert status["app"]["generation"] == 1
    assert status["app"]["queue_length"] == 0
    assert {w["state"] for w in status["app"]["workers"]} == {"idle"}
    assert sum(w["requests"] for w in status["app"]["workers"]) == 6
    metrics = server.admin("/metrics").text
    assert 'strata_app_requests_total{status="200"} 6' in metrics
    assert "strata_app_request_duration_seconds_count 6" in metrics
    assert "strata_app_queue_wait_seconds_bucket" in metrics
    assert 'strata_app_worker_restarts_total{cause="crash"} 0' in metrics
    assert server.admin("/healthz").text == "ok\n"
    assert server.admin("/nope").status_code == 404


def test_admin_token(strata):
    server = strata(*app("hello"), config='[admin]\ntoken = "s3cret"\n')
    assert server.admin("/status").status_code == 401
    url = f"http://127.0.0.1:{server.admin_port}/status"
    assert requests.get(url, headers={"Authorization": "Bearer s3cret"}).status_code == 200

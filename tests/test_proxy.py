"""The nginx reverse proxy of ``fedapp.ops.deploy up --secure`` (``fedapp.ops.proxy``): on the public port
only the Fleet API and /health reach the SuperLink; the Control and Runtime APIs answer 403 there
and stay reachable for the operator on the SuperLink's loopback port. The process test brings up
a real secure deployment (one to three minutes): marked e2e, skipped only where nginx is missing."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedapp.ops import certs, deploy, proxy
from fedapp.ops.deploy import CONNECTION, Deployment
from fedapp.ops.processes import group_alive
from fedapp.ops.superlink import TlsFiles, flwr_env, write_connection
from tests.conftest import PROJECT_DIR

NGINX = proxy.nginx_binary()
needs_nginx = pytest.mark.skipif(NGINX is None, reason=f"nginx is not on PATH: {proxy.NGINX_MISSING}")


def rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def post(port: int, path: str, ca: Path, body: bytes = b"") -> int:
    """HTTP status of a raw HTTPS POST of ``path`` (sent as is, not normalized) to 127.0.0.1:``port``."""
    conn = http.client.HTTPSConnection(
        "127.0.0.1", port, context=ssl.create_default_context(cafile=str(ca)), timeout=60
    )
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/protobuf"})
        return conn.getresponse().status
    finally:
        conn.close()


def test_secure_up_refuses_without_nginx_before_starting_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(deploy, "nginx_binary", lambda: None)
    deployment = Deployment(tmp_path / "deployment", secure=True, num_nodes=1)
    with pytest.raises(RuntimeError, match=r"apt-get install nginx"):
        deployment.up()
    assert "pid" not in deployment.state["superlink"] and not (tmp_path / "deployment" / "certs").exists()


@needs_nginx
def test_generated_config_passes_nginx_t_and_forwards_only_the_fleet_api(tmp_path):
    certs.make_certs(tmp_path / "certs")
    tls = TlsFiles(
        tmp_path / "certs" / certs.CA_CERT,
        tmp_path / "certs" / certs.SERVER_CERT,
        tmp_path / "certs" / certs.SERVER_KEY,
    )
    prefix, logs = tmp_path / "proxy", tmp_path / "logs"
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / sub).mkdir(parents=True)
    logs.mkdir()
    text = proxy.nginx_config(prefix, logs, "127.0.0.1", 8443, 9443, tls)
    (prefix / "nginx.conf").write_text(text)
    check = subprocess.run(
        [NGINX, "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(logs / "proxy-error.log")],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
    assert text.count("proxy_pass") == 2  # /v1/fleet/<rpc> and /health, nothing else
    for directive in (
        "daemon off;",
        "proxy_ssl_verify on;",
        f"proxy_ssl_trusted_certificate {tls.ca_cert};",
        "proxy_request_buffering off;",
        "proxy_buffering off;",
        "proxy_http_version 1.1;",
        "proxy_read_timeout 3600s;",
        "server 127.0.0.1:9443;",
        "listen 127.0.0.1:8443 ssl;",
    ):
        assert directive in text, directive
    assert "/var/log" not in text


def stranger_cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    """The Flower CLI with its own FLWR_HOME ``home`` (a host that holds only ca.crt)."""
    return subprocess.run(["flwr", *args], env=flwr_env(home), capture_output=True, text=True, timeout=120, cwd=home)


@pytest.mark.e2e
@needs_nginx
def test_strangers_reach_only_the_fleet_api_and_registered_nodes_train(small_run_config, tmp_path):
    config = {**small_run_config, "num-server-rounds": 2, "results-dir": str(tmp_path / "results"), "run-name": "run"}
    with Deployment(tmp_path / "deployment", secure=True, num_nodes=2) as deployment:
        public, internal = deployment.state["port"], deployment.superlink_port
        ca = deployment.certs_dir / certs.CA_CERT
        proxy_pid = deployment.state["proxy"]["pid"]
        assert public != internal and group_alive(proxy_pid) and os.getpgid(proxy_pid) == proxy_pid

        # (1) A stranger's CLI: only ca.crt and a fresh key of its own, connected to the public port.
        home = tmp_path / "stranger"
        write_connection(home, public, name="public", root_certificates=ca)
        certs.write_node_key(home / "stranger")
        for args in (
            ["supernode", "register", str(home / "stranger.pub"), "public"],
            ["ls", "public"],
            ["run", str(PROJECT_DIR), "public"],
        ):
            out = stranger_cli(home, *args)
            assert out.returncode != 0, (args, out.stdout[-2000:], out.stderr[-2000:])
        listed = deployment.flwr("supernode", "list", CONNECTION, "--format", "json")
        assert listed.returncode == 0, listed.stderr
        stranger_key = (home / "stranger.pub").read_text().split()[1]
        assert stranger_key not in listed.stdout
        assert len(json.loads(listed.stdout)["nodes"]) == 2
        # Raw HTTPS: Control, Runtime, docs, and paths that nginx would normalize into the Fleet API.
        for path in (
            "/v1/control/list-runs",
            "/v1/control/register-node",
            "/v1/control/start-run",
            "/v1/runtime/get-nodes",
            "/v1/runtime/pull-messages",
            "/docs",
            "/openapi.json",
            "/v1/fleet/..%2Fcontrol%2Flist-runs",
            "/v1/fleet/%2e%2e/control/list-runs",
            "/v1/control/..%2F..%2Fv1/fleet/get-run",
            "/v1/fleet/../control/list-runs",
            "/v1/fleet/get-run/../../control/list-runs",
        ):
            assert post(public, path, ca) == 403, path
        assert post(internal, "/v1/control/list-runs", ca) != 403  # the operator's loopback port answers
        with urllib.request.urlopen(
            f"https://127.0.0.1:{public}/health", context=ssl.create_default_context(cafile=str(ca)), timeout=10
        ) as r:
            assert r.status == 200
        # A large body streams through (arrays travel in 5 MB chunks): the SuperLink answers it as it
        # answers it directly (a 400 for this junk), not nginx with 413 or a 5xx from a temp folder.
        body = os.urandom(12 * 2**20)
        assert post(public, "/v1/fleet/push-object", ca, body) == post(internal, "/v1/fleet/push-object", ca, body)

        # (2) A SuperNode with an unregistered key, pointed at the public address, is refused.
        intruder = deployment.add_node({"partition-id": 0, "num-partitions": 2}, register=False, wait=False)
        with pytest.raises(RuntimeError, match="exited with code"):
            deployment.wait_joined(intruder, timeout=120)
        assert deployment.exit_code(intruder) not in (None, 0)

        # (3) The registered nodes (through the proxy) and the operator (on loopback) still work.
        registered = {node["node_id"] for node in deployment.state["nodes"][:2]}
        outcome = deployment.run(config, timeout=600)
        state = json.loads((deployment.run_dir / "state.json").read_text())
    assert state["proxy"]["pid"] == proxy_pid
    assert not group_alive(proxy_pid) and Deployment.load(deployment.run_dir).alive() == []
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(deployment.log_dir.glob("*.log")))
    assert outcome.ok, outcome.message + logs
    history = rounds(outcome.run_dir)
    assert [r["round"] for r in history] == [0, 1, 2]
    for record in history[1:]:
        assert len(record["train-clients"]["clients"]) == 2
        assert {c["node-id"] for c in record["train-clients"]["clients"]} == registered
    access = (deployment.log_dir / "proxy-access.log").read_text()
    assert "POST /v1/fleet/pull-messages" in access and "POST /v1/fleet/push-messages" in access
    assert "Permission denied" not in (deployment.log_dir / "proxy-error.log").read_text()

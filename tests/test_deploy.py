"""Deployment on real processes: a SuperLink and SuperNodes on 127.0.0.1 (``fedapp.ops.deploy``), with
TLS and SuperNode authentication (``fedapp.ops.certs``), and a SuperNode killed mid-round. The process
tests take one to three minutes each: marked e2e. Every process is stopped by PID even when a test
fails (the Deployment context manager), and each test checks that none is left."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedapp.ops import certs
from fedapp.ops.deploy import Deployment
from fedapp.ops.network import free_port, tls_problem
from fedapp.ops.processes import group_alive
from tests.conftest import PROJECT_DIR, fedvideo_command
from tests.test_tls_check import serve_tls


def rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def assert_all_stopped(deployment: Deployment) -> None:
    """No process recorded in state.json is left (checked by PID and by process group)."""
    state = json.loads((deployment.run_dir / "state.json").read_text())
    pids = [state["superlink"]["pid"], *(node["pid"] for node in state["nodes"])]
    assert not [pid for pid in pids if group_alive(pid)], f"still running: {pids}"
    assert Deployment.load(deployment.run_dir).alive() == []


def failure_text(outcome, deployment: Deployment) -> str:
    logs = sorted(deployment.log_dir.glob("*.log"))
    return outcome.message + "".join(f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in logs)


def test_certs_are_signed_for_loopback_and_private_keys_are_private(tmp_path):
    written = certs.make_certs(tmp_path, nodes=2, sans=["127.0.0.1", "localhost", "10.1.2.3"])
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o644 if path.suffix in {".crt", ".pem", ".pub"} else 0o600), (path, oct(mode))
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.1.2.3"]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    key = load_ssh_private_key((tmp_path / "node-1").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key((tmp_path / "node-1.pub").read_bytes()) == key.public_key()
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(FileExistsError):
        certs.make_certs(tmp_path, nodes=2)
    assert (tmp_path / "ca.key").read_bytes() == before
    assert certs.main([str(tmp_path), "--nodes", "1"]) == 1  # the CLI refuses too
    assert certs.main([str(tmp_path), "--nodes", "1", "--force"]) == 0
    assert (tmp_path / "ca.key").read_bytes() != before
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600


def test_cli_down_without_deployment_is_a_no_op(tmp_path):
    cmd = [fedvideo_command(), "deploy", "--dir", str(tmp_path / "none")]
    down = subprocess.run([*cmd, "down"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    stop = subprocess.run([*cmd, "stop-node", "0"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)
    assert stop.returncode == 1 and "run `up` first" in stop.stderr


@pytest.mark.e2e
def test_insecure_superlink_and_two_supernodes_complete_a_round(small_run_config, tmp_path, monkeypatch):
    """A round on real processes, started from pretrained weights in the server host's torch.hub
    cache (the ServerApp loads them; they reach the SuperNodes as the round-0 model). Rounds after
    the first on real processes: test_run_finishes_when_a_supernode_dies_mid_round."""
    from safetensors.numpy import load_file

    from tests.test_pretrained import place_random_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # inherited by the SuperLink's ServerApp
    state = place_random_weights("framepool_resnet18", "IMAGENET1K_V1")
    pretrained = {"model": "framepool_resnet18", "pretrained": "IMAGENET1K_V1", "clip-len": 4}
    config = {**small_run_config, **pretrained, "num-server-rounds": 1, "results-dir": str(tmp_path / "results"),
              "run-name": "run"}  # fmt: skip
    with Deployment(tmp_path / "deployment", num_nodes=2) as deployment:
        node_ids = {node["node_id"] for node in deployment.state["nodes"]}
        outcome = deployment.run(config, timeout=600)
    assert_all_stopped(deployment)
    assert outcome.ok, failure_text(outcome, deployment)
    # The deployment's state is its operator's only: the folder 0700, the database (every round's
    # weights), state.json, the logs and what Flower unpacked 0600/0700; so is what the deployed run wrote.
    assert stat.S_IMODE(deployment.run_dir.stat().st_mode) == 0o700
    written = [p for p in deployment.run_dir.rglob("*") if not p.is_symlink()]
    assert {"superlink.db", "state.json", "supernode-0.log", "superlink.log"} <= {p.name for p in written}
    loose = [f"{p} {oct(stat.S_IMODE(p.stat().st_mode))}" for p in written if p.stat().st_mode & 0o077]
    assert loose == []
    assert not (outcome.run_dir / "model.safetensors").stat().st_mode & 0o077
    assert outcome.summary["rounds-completed"] == 1
    history = rounds(outcome.run_dir)
    assert [r["round"] for r in history] == [0, 1]
    for record in history[1:]:
        assert {c["node-id"] for c in record["train-clients"]["clients"]} == node_ids
        assert {"loss", "video-accuracy"} <= set(record["central"])
    trained = load_file(str(outcome.run_dir / "model.safetensors"))["backbone.net.conv1.weight"]
    assert np.corrcoef(trained.ravel(), state["conv1.weight"].numpy().ravel())[0, 1] > 0.9  # from the file


@pytest.mark.e2e
def test_personal_heads_stay_on_real_supernodes(small_run_config, tmp_path):
    """FedPer on two SuperNodes: each keeps its head in its own state-dir (the deployment gives each
    node one), the server's run folder holds no personal state, the aggregated head never moves
    (no trained head reached the server), and ``predict --site --state-dir`` loads a site's model."""
    from fedapp.client.personal import PersonalStore, run_token
    from fedapp.server.checkpoint import list_checkpoints, load_checkpoint, model_from_checkpoint

    config = {**small_run_config, "num-server-rounds": 2, "personalization": "fedper", "partitioning": "dirichlet",
              "dirichlet-alpha": 0.1, "results-dir": str(tmp_path / "results"), "run-name": "run"}  # fmt: skip
    with Deployment(tmp_path / "deployment", num_nodes=2) as deployment:
        outcome = deployment.run(config, timeout=600)
    assert_all_stopped(deployment)
    assert outcome.ok, failure_text(outcome, deployment)
    assert not (outcome.run_dir / "personal").exists()
    first, final = (load_checkpoint(p).arrays for p in list_checkpoints(outcome.run_dir)[:2])
    for site in (0, 1):
        state_dir = deployment.node_home(site) / "state"
        store = PersonalStore(state_dir / f"run-{run_token(outcome.run_dir)}" / f"site-{site}")
        assert store.rounds() == [1, 2]
        own = store.load(2)[1]
        assert set(own) == {"head.weight", "head.bias"}
        np.testing.assert_array_equal(first["head.weight"], final["head.weight"])
        assert float(np.abs(own["head.weight"] - final["head.weight"]).max()) > 1e-3
        model, _, _ = model_from_checkpoint(outcome.run_dir, site=site, state_dir=state_dir)
        np.testing.assert_array_equal(model.state_dict()["head.weight"].numpy(), own["head.weight"])
    evaluated = rounds(outcome.run_dir)[-1]["evaluate-clients"]["clients"]
    assert len(evaluated) == 2 and all("personal-video-accuracy" in c for c in evaluated)
    assert outcome.summary["final-sites"]["personal"]["sites"] == 2


# TLS + SuperNode auth behind the proxy (registered keys only, strangers refused, nodes train):
# tests/test_proxy.py.


def test_a_tls_failure_is_named_not_called_a_network_problem(tmp_path):
    """`run` against a SuperLink whose certificate the CLI's CA did not sign says so."""
    certs.make_certs(tmp_path / "other")
    deployment = Deployment(tmp_path / "deployment", secure=True, num_nodes=0, certs_dir=tmp_path / "other")
    deployment.state["superlink"] = {"pid": os.getpgrp(), "start-time": None}  # "running": this process group
    port, stop = free_port(), threading.Event()
    certs.make_certs(tmp_path / "real")
    server = threading.Thread(target=serve_tls, args=(tmp_path / "real", port, stop), daemon=True)
    server.start()
    try:
        deadline = time.monotonic() + 30
        while (
            "cannot reach" in (tls_problem("127.0.0.1", port, tmp_path / "real" / certs.CA_CERT) or "")
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)  # until the test server listens
        deployment.state["superlink-port"] = port
        outcome = deployment.run({"run-name": "x", "results-dir": str(tmp_path / "results")})
    finally:
        stop.set()
        server.join(timeout=5)
    assert not outcome.ok and "is not trusted by" in outcome.message
    assert not (tmp_path / "results" / "x").exists()


def kill_when_training(deployment: Deployment, k: int, nth: int = 1, timeout: float = 300.0) -> None:
    """SIGKILL SuperNode ``k`` (a crash) as soon as it has started its ClientApp for its ``nth`` train
    message of the run (1: round 1's training; under secagg, 3: round 1's masked update)."""
    node = deployment.state["nodes"][k]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(deployment.node_log(k), "rb") as log:
            log.seek(node["log_offset"])
            parts = log.read().split(b"Receiving: train message")
            if len(parts) > nth and b"Start `flwr-clientapp` process" in parts[nth]:
                deployment.stop_node(k, kill=True)
                return
        time.sleep(0.2)


@pytest.mark.e2e
def test_run_finishes_when_a_supernode_dies_mid_round(small_run_config, tmp_path):
    """3 SuperNodes, 2 needed; one is killed during round 1's training. Its reply becomes an error
    after about 60 s (Flower marks the node unavailable), round 1 aggregates the other two, round 2
    runs on the survivors."""
    config = {
        **small_run_config,
        "num-server-rounds": 2,
        "min-train-nodes": 2,
        "min-evaluate-nodes": 2,
        "min-available-nodes": 2,
        "round-timeout": 150.0,
        "results-dir": str(tmp_path / "results"),
        "run-name": "run",
    }
    with Deployment(tmp_path / "deployment", num_nodes=3) as deployment:
        killer = threading.Thread(target=kill_when_training, args=(deployment, 2), daemon=True)
        killer.start()
        outcome = deployment.run(config, timeout=300)
        killer.join(timeout=10)
        assert deployment.alive() == ["superlink", "node-0", "node-1"]
    assert_all_stopped(deployment)
    assert outcome.ok, failure_text(outcome, deployment)
    survivors = {node["node_id"] for node in deployment.state["nodes"][:2]}
    round_1, round_2 = rounds(outcome.run_dir)[1:]
    assert {c["node-id"] for c in round_1["train-clients"]["clients"]} == survivors
    # The error reply comes from the SuperLink, so it names node 1 (the SuperLink), not the dead node.
    [failure] = round_1["train-clients"]["failed"]
    assert "error code 5" in failure["reason"]
    assert {c["node-id"] for c in round_2["train-clients"]["clients"]} == survivors


@pytest.mark.e2e
def test_secure_aggregation_on_tls_supernodes_survives_one_killed_after_sharing_keys(small_run_config, tmp_path):
    """SecAgg+ over TLS with SuperNode authentication: three SuperNodes, threshold 2. Node 2 is killed
    as its ClientApp starts round 1's third step (the masked update: its key shares are out). Round 1
    unmasks the other two (the dead node's pairwise masks rebuilt from their shares) and trains the
    model; round 2 runs SecAgg+ on the two SuperNodes left. No reply the server recorded held a model."""
    config = {
        **small_run_config,
        "num-server-rounds": 2,
        "secagg": True,
        "min-train-nodes": 2,
        "min-evaluate-nodes": 2,
        "min-available-nodes": 2,
        "round-timeout": 150.0,
        "results-dir": str(tmp_path / "results"),
        "run-name": "run",
    }
    with Deployment(tmp_path / "deployment", secure=True, num_nodes=3) as deployment:
        killer = threading.Thread(target=kill_when_training, args=(deployment, 2, 3), daemon=True)
        killer.start()
        outcome = deployment.run(config, timeout=400)
        killer.join(timeout=10)
        assert deployment.alive() == ["superlink", "proxy", "node-0", "node-1"]
    assert_all_stopped(deployment)
    assert outcome.ok, failure_text(outcome, deployment)
    survivors = {node["node_id"] for node in deployment.state["nodes"][:2]}
    dead = deployment.state["nodes"][2]["node_id"]
    round_1, round_2 = rounds(outcome.run_dir)[1:]
    first, second = round_1["fusion"]["secagg"], round_2["fusion"]["secagg"]
    assert (first["sampled"], first["shared-keys"], first["contributors"], first["dropped"]) == (3, 3, 2, [dead])
    assert {c["node-id"] for c in round_1["train-clients"]["clients"]} == survivors
    assert [f["node-id"] for f in round_1["train-clients"]["failed"]] == [dead]
    assert (second["sampled"], second["contributors"], second["dropped"]) == (2, 2, [])
    assert outcome.summary["rounds-without-update"] == 0
    assert round_2["bytes-up"] > 0 and round_2["central"]["video-accuracy"] is not None

"""Simulation on an existing Ray cluster: ``fedvideo run --ray-address HOST:PORT``.

The end-to-end test starts a Ray head of its own on this machine (``ray start --head``, the venv's
``ray``), runs 2 rounds on it and proves from the cluster's own session logs that the simulation
ran there and not on a Ray of its own; it is marked ``e2e`` like ``tests/test_e2e.py``. The other
tests are the refusals before anything starts (no cluster needed, well under a second each) and
what happens to an inherited ``RAY_ADDRESS``.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fedapp.ops.flwr_run import config_text
from fedapp.ops.network import free_port
from fedapp.ops.processes import stop_group
from fedapp.ops.ray_cluster import RAY_PRIVATE, parse_ray_address, ray_cluster_problem, ray_environment
from tests.conftest import PROJECT_DIR, fedvideo_command

# One worker runs these and tests/test_plain_flwr_run.py one after the other (see there).
pytestmark = pytest.mark.xdist_group("ray-head")

RAY = Path(sys.executable).parent / "ray"


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the caller's Ray settings (the option under test sets the address)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def fedvideo_run(
    *args: str, tmp_path: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [fedvideo_command(), "run", *args],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(FEDVIDEO_FLWR_HOME=str(tmp_path / "flwr_home"), **(env or {})),
    )


def our_processes(marker: str) -> list[int]:
    """PIDs whose command line names ``marker`` (the head's unique temp dir): Ray's daemons all do."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@contextmanager
def ray_head(num_cpus: int = 2, auth: dict[str, str] | None = None) -> Iterator[tuple[str, Path]]:
    """A Ray head on this machine: yields its GCS address and its session's log folder. ``auth``:
    Ray's token authentication (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``): Ray listens on every
    interface whatever ``--node-ip-address`` says, and without a token anyone who reaches the
    ports can run code in the cluster.

    Stopped in ``finally`` whatever happens, by process group, not with ``ray stop``: ``ray stop``
    takes no address or temp dir and stops every Ray process of the machine (it matches process
    names), a concurrent simulation's private Ray included. Every daemon ``ray start`` leaves
    behind stays in the new session it is started in, and the actors are the raylet's children.
    """
    # Short and unique: Ray's unix sockets live under it (107-character limit), and it names our processes.
    temp = Path(tempfile.mkdtemp(prefix="fvray-", dir="/tmp"))
    port = free_port()
    cmd = [
        str(RAY),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--temp-dir={temp}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        # Fixed defaults (10001, 52365) could be taken on a shared machine: free ports instead.
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
    ]
    log = temp / "ray-start.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=clean_env(**(auth or {})), cwd=temp, start_new_session=True
        )
    try:
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        yield f"127.0.0.1:{port}", temp / "session_latest" / "logs"
    finally:
        stop_group(proc.pid, grace=3.0, proc=proc)
        for pid in our_processes(str(temp)):  # none expected: a safety net, by PID
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


# ------------------------------------------------------------------ the run on a cluster


@pytest.mark.e2e
def test_simulation_runs_on_the_ray_cluster_it_is_given(small_run_config, tmp_path):
    """2 rounds on a Ray head started here (token authentication on): the run completes, both
    clients train in both rounds, and the cluster's session logs show the run's Ray driver and the
    actors that trained (the actor PIDs of the run's own output, each with its training lines in
    the cluster's worker log). Without --ray-address the same run completes on a Ray of its own
    (in /tmp/ray) and this test fails at the driver check: no new driver log here (checked by hand)."""
    results = tmp_path / "results"
    config = {**small_run_config, "num-server-rounds": 2, "results-dir": str(results), "run-name": "run"}
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # The clients' per-step lines are debug: Flower's switch, for the launch and the cluster's workers.
    debug = {**auth, "FLWR_LOG_LEVEL": "DEBUG"}
    started = time.monotonic()
    with ray_head(num_cpus=2, auth=debug) as (address, logs):
        # Without the token the launcher refuses at once (ray.init would fail after ~20 s).
        assert "requires token authentication and this shell has no token" in ray_cluster_problem(address, {})
        before = set(os.listdir(logs))
        proc = fedvideo_run(
            "--ray-address",
            address,
            "--run-config",
            config_text(config),
            "--federation-config",
            "num-supernodes=2 client-resources-num-cpus=1",
            "--timeout",
            "240",
            tmp_path=tmp_path,
            env=debug,
        )
        output = proc.stdout + proc.stderr
        new = sorted(set(os.listdir(logs)) - before)
        worker_logs = {name: (logs / name).read_text(errors="replace") for name in new if name.startswith("worker-")}
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, output[-4000:]
    assert f"simulation on the Ray cluster at {address}" in output

    # It trained: both clients accepted with examples in both rounds.
    summary = json.loads((results / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds-completed"] == 2
    rounds = [json.loads(line) for line in (results / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for record in rounds[1:]:
        clients = record["train-clients"]
        assert record["train-clients"]["rejected"] == [] and clients["failed"] == []
        assert sorted(c["partition-id"] for c in clients["clients"]) == [0, 1]
        assert all(c["num-examples"] > 0 for c in clients["clients"])

    # It ran on this cluster: one new Ray driver (the simulation process) ...
    drivers = [name for name in new if name.startswith("python-core-driver-")]
    assert len(drivers) == 1, new
    # ... and the actors the run's output names (Ray prefixes their lines with their PID) are
    # workers of this cluster, whose logs hold every partition's training in every round.
    actor_pids = set(re.findall(r"\(ClientAppActor pid=(\d+)\)", output))
    assert actor_pids, output[-3000:]
    pids_here = {m.group(1) for name in worker_logs if (m := re.search(r"-(\d+)\.(?:out|err)$", name))}
    assert actor_pids <= pids_here, (actor_pids, sorted(worker_logs))
    trained = "\n".join(worker_logs.values())
    for partition in (0, 1):
        for rnd in (1, 2):
            assert f"[partition {partition} round {rnd}]" in trained, trained[-3000:]
    # A hang guard for CI's 2 cores, not a speed claim (README Tests: the figure measured here).
    assert elapsed < 240, f"{elapsed:.0f} s"


# ------------------------------------------------------------------ refused before anything starts


def assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "results").exists() and not (tmp_path / "flwr_home").exists()


def test_an_unreachable_cluster_is_refused_before_anything_starts(tmp_path):
    port = free_port()  # nothing listens there
    proc = fedvideo_run(
        "--ray-address",
        f"127.0.0.1:{port}",
        "--run-config",
        f'results-dir="{tmp_path / "results"}"',
        tmp_path=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"FAILED: --ray-address 127.0.0.1:{port}: cannot connect ([Errno 111] Connection refused): "
        f"is `ray start --head --port={port}` running on 127.0.0.1, and the port open to this host?"
    ]
    assert proc.stdout == ""  # no Flower, no Ray: no fallback to a Ray of its own
    assert_nothing_written(tmp_path)


def test_init_args_num_cpus_with_a_cluster_is_refused_before_anything_starts(tmp_path):
    """Ray refuses num_cpus/num_gpus when it joins a cluster (the run would fail after writing its
    folder); the launcher refuses the pair first, before it looks for the cluster."""
    proc = fedvideo_run(
        "--ray-address",
        f"127.0.0.1:{free_port()}",
        "--run-config",
        f'results-dir="{tmp_path / "results"}"',
        "--federation-config",
        "num-supernodes=3 init-args-num-cpus=4 init-args-num-gpus=1",
        tmp_path=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(
        "FAILED: config: --federation-config init-args-num-cpus init-args-num-gpus cannot be used with "
        "--ray-address: Ray refuses num_cpus/num_gpus when it joins a cluster"
    )
    assert proc.stdout == ""
    assert_nothing_written(tmp_path)


def test_init_args_stay_allowed_without_a_cluster():
    from fedapp.ops.ray_cluster import check_ray_federation
    from fedapp.task.config import ConfigError

    check_ray_federation('num-supernodes=3 client-resources-num-cpus=1 init-args-logging-level="INFO"')
    with pytest.raises(ConfigError, match="init-args-num-gpus cannot be used with --ray-address"):
        check_ray_federation("init-args-num-gpus=1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ray://head:10001", "not a URL (Ray Client ray:// is not supported)"),
        ("head", "give the head's GCS address as HOST:PORT"),
        ("head:", "give the head's GCS address as HOST:PORT"),
        ("head:65536", "port 65536 is out of range"),
        ("::1:6379", "give the head's GCS address as HOST:PORT"),
    ],
)
def test_a_malformed_address_is_refused(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_ray_address(text)


def test_addresses_that_parse():
    assert parse_ray_address("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert parse_ray_address("head.example.org:6379") == ("head.example.org", 6379)
    assert parse_ray_address("[fd00::5]:6379") == ("fd00::5", 6379)


def test_a_port_that_is_not_a_ray_gcs_is_named_as_such():
    """Something listens (here an HTTP server; the Ray Client port 10001 answers the same way):
    ray.init would retry there for minutes, the launcher says what it is at once."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        problem = ray_cluster_problem(address, {})
    finally:
        server.shutdown()
        server.server_close()
    assert problem is not None and problem.startswith(
        f"--ray-address {address}: something listens there, but it is not a Ray head's GCS port"
    )


# ------------------------------------------------------------------ RAY_ADDRESS in the environment


def test_an_inherited_ray_address_is_set_aside_with_a_note():
    """Without --ray-address the simulation gets a Ray of its own: RAY_ADDRESS=local, which also
    stops ray.init from joining a cluster that `ray start --head` recorded in /tmp/ray."""
    env = {"RAY_ADDRESS": "10.0.0.5:6379"}
    note = ray_environment(env, None)
    assert env["RAY_ADDRESS"] == RAY_PRIVATE == "local"
    assert note == (
        "note: RAY_ADDRESS=10.0.0.5:6379 in your environment is ignored; this simulation starts a Ray of its own. "
        "To run on that cluster: fedvideo run --ray-address 10.0.0.5:6379 ..."
    )
    env = {}
    assert ray_environment(env, None) is None and env["RAY_ADDRESS"] == "local"
    env = {"RAY_ADDRESS": "10.0.0.5:6379"}
    assert ray_environment(env, "10.0.0.6:6380") is None and env["RAY_ADDRESS"] == "10.0.0.6:6380"
    env = {}
    ray_environment(env, "[fd00::5]:6379")
    assert env["RAY_ADDRESS"] == "[fd00::5]:6379"

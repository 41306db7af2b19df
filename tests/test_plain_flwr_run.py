"""Plain `flwr run .`, as the README documents it: Flower's default of 2 simulated SuperNodes, the
outcome read from `flwr ls` (a failed run visible as failed), a misspelled key refused by Flower
with code 15, and the local SuperLink Flower leaves running stopped by the command the README gives.
About a minute: marked e2e."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import PROJECT_DIR, SMALL_SYNTHETIC

# One worker runs this and tests/test_ray_cluster.py one after the other: without RAY_ADDRESS, the
# simulation of a plain `flwr run .` joins a Ray head that `ray start --head` runs on this machine.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("ray-head")]


def small(results: Path, name: str) -> str:
    config = {
        **SMALL_SYNTHETIC,
        "clip-len": 8,
        "resize": "32x32",
        "crop-size": 32,
        "eval-clips": 1,
        "local-epochs": 1,
        "num-server-rounds": 1,
        "tensorboard": False,
        "torch-threads": 1,
        "results-dir": str(results),
        "run-name": name,
    }
    return " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())


def local_superlinks(flwr_home: Path) -> list[psutil.Process]:
    """The local SuperLinks Flower started for this FLWR_HOME (their log file lies under it)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any("flower-superlink" in part for part in cmdline) and any(str(flwr_home) in p for p in cmdline):
            found.append(proc)
    return found


def test_plain_flwr_run_as_the_readme_says(tmp_path):
    flwr_home = tmp_path / "flwr_home"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the activated venv
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # Ports of our own: a local SuperLink of another FLWR_HOME must not answer for this one.
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39191",
        "FLWR_LOCAL_CONTROL_API_PORT": "39193",
    }

    def flwr(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["flwr", *args], cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=600, check=False
        )

    results = tmp_path / "results"
    try:
        ok = flwr("run", ".", "--stream", "--run-config", small(results, "ok"))
        assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
        summary = json.loads((results / "ok" / "summary.json").read_text())
        assert summary["status"] == "completed"
        first_round = json.loads((results / "ok" / "rounds.jsonl").read_text().splitlines()[1])
        assert len(first_round["train-clients"]["clients"]) == 2  # Flower's default federation size

        bad = flwr("run", ".", "--stream", "--run-config", small(results, "bad") + ' data-dir="/my/videos"')
        assert bad.returncode == 0  # Flower's exit status says nothing about the run
        assert 'data-dir="/my/videos" does nothing here' in bad.stdout + bad.stderr
        failed = json.loads((results / "bad" / "summary.json").read_text())  # the ServerApp's own check
        assert failed["status"] == "failed" and failed["rounds-completed"] == 0
        assert "does nothing here" in failed["error"]

        listed = flwr("ls", "--format", "json")
        assert listed.returncode == 0, listed.stderr
        statuses = sorted(run["status"] for run in json.loads(listed.stdout)["runs"])
        assert statuses == ["finished:completed", "finished:failed"]

        typo = flwr("run", ".", "--run-config", "num-server-round=2")
        assert typo.returncode != 0 and "[code: 15] Invalid run configuration." in typo.stdout + typo.stderr
        assert local_superlinks(flwr_home), "Flower leaves its local SuperLink running"
    finally:
        # The README's stop command, narrowed to this test's SuperLink.
        for proc in local_superlinks(flwr_home):
            proc.terminate()
        psutil.wait_procs(local_superlinks(flwr_home), timeout=20)
    assert not local_superlinks(flwr_home)

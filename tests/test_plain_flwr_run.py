"""Plain `flwr run .`, as docs/getting-started.md documents it: Flower's default of 2 simulated
SuperNodes, the outcome read from `flwr ls --format json` (a failed run visible as failed), a
misspelled key refused by Flower with code 15, and the local SuperLink Flower leaves running stopped
by its pid with the page's own command line. About a minute: marked e2e."""

from __future__ import annotations

import json
import os
import re
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


def documented_commands() -> list[str]:
    """The bash block of the page's "Plain `flwr run .`" section, one command per line."""
    page = (PROJECT_DIR / "docs" / "getting-started.md").read_text()
    section = page.split("## Plain `flwr run .`", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_plain_flwr_run_as_the_docs_say(tmp_path):
    commands = documented_commands()
    assert "flwr ls --format json" in commands  # plain `flwr ls` cuts the status at 80 columns
    (stop,) = [line for line in commands if line.startswith("kill ")]
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
        # Another user's (another FLWR_HOME's) local SuperLink, as its command line reads: the broad
        # `pkill -f "flower-superlink --insecure --simulation"` the docs gave before stopped it too.
        decoy = "flower-superlink --insecure --simulation --log-file /home/other/.flwr/local-superlink/superlink.log"
        other = subprocess.Popen(["bash", "-c", f'exec -a "{decoy}" sleep 600'])
        # The page's stop command, as a user's shell runs it (FLWR_HOME set: this test's SuperLink only).
        stopped = subprocess.run(["bash", "-c", stop], env=env, capture_output=True, text=True, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        psutil.wait_procs(local_superlinks(flwr_home), timeout=20)
        assert not local_superlinks(flwr_home) and other.poll() is None
        other.kill()
    finally:
        for proc in local_superlinks(flwr_home):  # only if the documented command failed
            proc.terminate()
        psutil.wait_procs(local_superlinks(flwr_home), timeout=20)
    assert not local_superlinks(flwr_home)

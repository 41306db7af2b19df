"""deterministic = true: the same seed gives bit-identical runs, in two fresh processes (in process,
with node sampling) and in two real launches; refused with DP, whose noise the public seed would
give away."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from fedapp.server.results import load_weights
from fedapp.task.config import ConfigError, parse_config
from tests.conftest import PROJECT_DIR, fedvideo_command, small_config

# A fresh process per run: what differs between processes (Python's hash seed, the random module's
# state, node ids) is what the key must make irrelevant. fraction-train 0.6 makes Flower sample.
RUN = """
import hashlib, json, sys, tempfile
from pathlib import Path
from bench.inprocess import run_inprocess
from fedapp.server.results import load_weights
config = json.loads(sys.argv[1])
with tempfile.TemporaryDirectory() as tmp:
    results = run_inprocess(config, 5, Path(tmp) / "run")
    weights = load_weights(Path(tmp) / "run" / "model.safetensors")
sites = [sorted(c["partition-id"] for c in r["train-clients"]["clients"]) for r in results.rounds[1:]]
digest = hashlib.sha256(b"".join(weights[k].tobytes() for k in sorted(weights))).hexdigest()
print(json.dumps({"weights": digest, "sites": sites}))
"""


def in_fresh_process(config: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", RUN, json.dumps(config)], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_processes_give_bit_identical_runs(cache_dir):
    config = {**small_config(cache_dir), "num-server-rounds": 3, "fraction-train": 0.6, "min-train-nodes": 3,
              "min-available-nodes": 5, "fraction-evaluate": 0.5, "tensorboard": False,
              "deterministic": True}  # fmt: skip
    first, second = in_fresh_process(config), in_fresh_process(config)
    assert first == second  # the same sites sampled every round, the same weights to the bit
    assert len({tuple(s) for s in first["sites"]}) > 1  # and sampling did choose (not every site, every round)


def test_deterministic_is_refused_with_dp():
    with pytest.raises(ConfigError, match="deterministic=true does not go with dp='server-side'"):
        parse_config({"deterministic": True, "dp": "server-side"})


@pytest.mark.e2e
def test_two_launches_give_bit_identical_models(cache_dir, tmp_path):
    """Through Flower's simulation engine (Ray actors, node ids drawn anew each run): every node
    sampled, replies in partition order, torch's deterministic kernels."""
    config = {**small_config(cache_dir), "num-server-rounds": 2, "tensorboard": False, "deterministic": True,
              "results-dir": str(tmp_path / "results")}  # fmt: skip
    digests = []
    for name in ("first", "second"):
        text = " ".join(f"{k}={json.dumps(v)}" for k, v in {**config, "run-name": name}.items())
        proc = subprocess.run(
            [fedvideo_command(), "run", "--run-config", text],
            cwd=PROJECT_DIR,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "FEDVIDEO_FLWR_HOME": str(tmp_path / "flwr_home")},
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        # The weights, by name (the file's bytes are not: safetensors writes its metadata map in a
        # per-process random order).
        weights = load_weights(tmp_path / "results" / name / "model.safetensors")
        digests.append({k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in weights.items()})
    assert digests[0] == digests[1]

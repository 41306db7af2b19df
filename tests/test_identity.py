"""Behaviour kept bit for bit: in-process runs of a fixed list of configurations give the same
round records and final model as the code before strategies were cut into stages.

``tests/data/identity_records.json`` was written by ``python -m tests.test_identity --write`` on
commit 6a1a720 (one ``VideoFedAvg`` class switched by flags, before the stage registry). Each run
is 2 rounds (so server-optimizer state, SCAFFOLD's control variate and momentum act on a second
step) on the small synthetic task with one torch thread (deterministic). The record keeps
everything a round writes except times and memory; the final model is compared by the SHA-256 of
every tensor's bytes, by name. Rewrite the file only for a change that is meant to alter results,
and say so in the commit. Re-recorded since: fedavgm, fedadam, fedyogi and fedadagrad, when the
server optimizer's state went from float64 to the parameters' dtype (float32).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import small_config

RECORDS = Path(__file__).parent / "data" / "identity_records.json"
NODES = 5
KRUM5 = {"min-train-nodes": 5, "min-available-nodes": 5}
SEVEN = {"min-train-nodes": 7, "min-available-nodes": 7}
SGD = {"optimizer": "sgd", "momentum": 0.0, "lr": 0.05}
CONFIGS: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "average": {"strategy": "average"},
    "weighted-inverse-loss": {"strategy": "weighted", "weight-source": "inverse-loss"},
    "weighted-staleness": {"strategy": "weighted", "weight-source": "staleness", "staleness-decay": 0.7},
    "fedavgm": {"server-momentum": 0.9, "server-lr": 0.5},
    "fedadam": {"server-optimizer": "adam", "server-lr": 0.01},
    "fedyogi": {"server-optimizer": "yogi", "server-lr": 0.01, "server-tau": 0.01},
    "fedadagrad": {"server-optimizer": "adagrad", "server-lr": 0.1},
    "fedprox": {"proximal-mu": 0.01},
    "scaffold": {"scaffold": True, **SGD},
    "median": {"strategy": "fusion", "fusion-fn": "median"},
    "trimmed-mean": {"strategy": "fusion", "fusion-fn": "trimmed-mean", "trim-beta": 0.2},
    "geometric-median": {"strategy": "fusion", "fusion-fn": "geometric-median"},
    "krum": {"strategy": "fusion", "fusion-fn": "krum", **KRUM5},
    "multi-krum": {"strategy": "fusion", "fusion-fn": "krum", "krum-selected": 3, **KRUM5},
    "bulyan": {"strategy": "fusion", "fusion-fn": "bulyan", **SEVEN},
    "centered-clipping": {"strategy": "fusion", "fusion-fn": "centered-clipping", "cc-radius": 0.5, "cc-iterations": 2},
    "feddf": {"strategy": "fusion", "fusion-fn": "feddf", "feddf-steps": 4, "feddf-videos": 8},
    "nnm-median": {"strategy": "fusion", "fusion-fn": "median", "nnm-malicious": 1},
    "bucketing-krum": {"strategy": "fusion", "fusion-fn": "krum", "bucket-size": 2, **SEVEN},
    "norm-bound": {"norm-bound": 0.5},
    "norm-bound-median": {"strategy": "fusion", "fusion-fn": "median", "norm-bound": 0.5},
    "dp-server-side": {"dp": "server-side", "dp-noise-multiplier": 0.5, "dp-clipping-norm": 2.0},
    "dp-client-side": {"strategy": "average", "dp": "client-side", "dp-noise-multiplier": 0.5, "dp-clipping-norm": 2.0},
    "int8": {"compression": "int8"},
    "topk": {"compression": "topk", "topk-fraction": 0.1},
    "fedbn": {"fedbn": True},
    "alie-median": {"strategy": "fusion", "fusion-fn": "median", "attack": "alie", "attack-fraction": 0.4},
}
# What a round record holds that depends on the machine, not on the computation.
VOLATILE = ("round-time-s", "server-s", "server-peak-rss-mb", "wall-time-s", "clips-per-s")


def without_volatile(value: Any) -> Any:
    """``value`` with every timing or memory entry removed, at any depth (client metrics too)."""
    if isinstance(value, dict):
        return {k: without_volatile(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [without_volatile(v) for v in value]
    return value


def run_config(name: str, cache_dir: str) -> dict[str, Any]:
    base = {
        **small_config(cache_dir),
        "num-server-rounds": 2,
        "tensorboard": False,
        "min-train-nodes": NODES,
        "min-available-nodes": NODES,
    }
    return {**base, **CONFIGS[name]}


def record_of(name: str, cache_dir: str, run_dir: Path) -> dict[str, Any]:
    """What run ``name`` wrote, minus times and memory; the final model as SHA-256 per tensor."""
    from bench.inprocess import run_inprocess
    from fedapp.server.results import MODEL_FILE, load_weights

    config = run_config(name, cache_dir)
    nodes = max(NODES, config["min-available-nodes"])
    random.seed(0)  # Flower samples the round's nodes with `random`: their order is the sum's order
    np.random.seed(0)  # Flower's DP wrappers draw their noise from numpy's global generator
    results = run_inprocess(config, nodes, run_dir)
    rounds = without_volatile(results.rounds)
    model = load_weights(run_dir / MODEL_FILE)
    hashes = {k: hashlib.sha256(v.tobytes()).hexdigest() + f" {v.dtype} {list(v.shape)}" for k, v in model.items()}
    # Through JSON, as the golden file holds it (tuples become lists, keys strings).
    return json.loads(json.dumps({"rounds": rounds, "model": hashes}, sort_keys=True))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_records_are_bit_identical_to_before_stages(name, cache_dir, tmp_path):
    expected = json.loads(RECORDS.read_text())[name]
    got = record_of(name, str(cache_dir), tmp_path / "run")
    assert got["model"] == expected["model"], f"{name}: the final model differs"
    for mine, theirs in zip(got["rounds"], expected["rounds"], strict=True):
        for key in sorted(set(mine) | set(theirs)):
            assert mine.get(key) == theirs.get(key), f"{name} round {mine['round']}: {key!r} differs"


if __name__ == "__main__" and "--write" in sys.argv:
    # `--write` re-records every configuration; `--write NAME ...` only those named, the rest kept.
    import tempfile

    names = [arg for arg in sys.argv[1:] if arg != "--write"] or list(CONFIGS)
    out = json.loads(RECORDS.read_text()) if RECORDS.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        out.update({name: record_of(name, f"{tmp}/cache", Path(tmp) / name) for name in names})
    RECORDS.parent.mkdir(exist_ok=True)
    RECORDS.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(names)} records to {RECORDS}")

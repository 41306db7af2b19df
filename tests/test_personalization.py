"""Personalization (FedPer, FedRep, Ditto): each site's own model, kept on its own disk, never sent;
reported beside the global model, resumed with the run, and usable by ``fedvideo predict/export``.
The deployment on real SuperNodes: tests/test_deploy.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.inprocess import run_inprocess
from fedapp.client.personal import PersonalStateError, PersonalStore, run_token, site_folder
from fedapp.server.checkpoint import list_checkpoints, load_checkpoint, model_from_checkpoint
from fedapp.server.results import load_weights
from fedapp.task.config import ConfigError, parse_config
from tests.conftest import PROJECT_DIR
from tests.test_checkpoint import run_rounds

SITES = 3


def skewed(small_run_config: dict, method: str, rounds: int = 3, **extra) -> dict:
    """Three sites with few classes each (Dirichlet 0.1), every site trains and evaluates each round."""
    return {
        **small_run_config,
        "num-server-rounds": rounds,
        "min-train-nodes": SITES,
        "min-available-nodes": SITES,
        "min-evaluate-nodes": SITES,
        "partitioning": "dirichlet",
        "dirichlet-alpha": 0.1,
        "local-epochs": 2,
        "deterministic": True,
        "tensorboard": False,
        "personalization": method,
        **extra,
    }


def heads(arrays: dict) -> dict:
    return {k: v for k, v in arrays.items() if k.startswith("head.")}


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fedper_run(small_run_config, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("fedper") / "run"
    run_inprocess(skewed(small_run_config, "fedper"), SITES, run_dir, wire=True)
    return run_dir


def test_config_refuses_what_personalization_cannot_do():
    for bad, words in (
        ({"personalization": "fedper", "scaffold": True, "optimizer": "sgd", "momentum": 0.0}, "scaffold"),
        ({"personalization": "fedrep", "model": "docs.examples.my_model:build"}, "head.*"),
        ({"personalization": "fedper", "strategy": "fusion", "fusion-fn": "feddf"}, "feddf"),
        ({"personalization": "fedper", "ditto-lambda": 1.0}, 'personalization="ditto"'),
        ({"personalization": "fedper", "personal-epochs": 3}, "fedrep"),
        ({"personal-dir": "/x"}, "personalization"),
        ({"personalization": "fedavg"}, "fedper, fedrep, ditto"),
    ):
        with pytest.raises(ConfigError, match=words.replace("*", r"\*").replace("(", r"\(")):
            parse_config(bad, check_paths=False)
    assert parse_config({"personalization": "ditto", "ditto-lambda": 0.5}, check_paths=False).ditto_lambda == 0.5


def test_a_store_keeps_the_newest_rounds_and_never_continues_from_the_future(tmp_path):
    store = PersonalStore(tmp_path / "site-0", keep=2)
    assert store.load(5) is None  # a site without a personal part yet
    for r in (1, 2, 3):
        store.save(r, {"head.weight": np.full((2, 2), r, np.float32)})
    assert store.rounds() == [2, 3]
    assert store.load(2)[0] == 2 and float(store.load(9)[1]["head.weight"][0, 0]) == 3
    # A resumed run repeats round 3 from round 2's state: the old round 3 is replaced, not kept beside it.
    store.save(3, {"head.weight": np.full((2, 2), 30, np.float32)})
    assert float(store.load(3)[1]["head.weight"][0, 0]) == 30
    # Resuming from round 1, older than anything the site kept: refused, not continued from round 2.
    with pytest.raises(PersonalStateError, match="none at or before round 1"):
        store.load(1)


def test_fedper_heads_stay_at_the_sites_and_beat_the_global_model_there(fedper_run):
    """The head the server aggregates never moves (every site sends the received one back), so no
    site's trained head reached it; each site's own head does move, and on its own test videos the
    personal model beats the global one by a wide margin under label skew."""
    checkpoints = [load_checkpoint(p) for p in list_checkpoints(fedper_run)]
    assert [c.round for c in checkpoints] == [1, 2, 3]
    final = load_weights(fedper_run / "model.safetensors")
    for checkpoint in checkpoints:
        for key, value in heads(checkpoint.arrays).items():
            np.testing.assert_array_equal(value, heads(final)[key])
    for site in range(SITES):
        store = PersonalStore(fedper_run / "personal" / f"site-{site}")
        assert store.rounds() == [1, 2, 3]
        own = store.load(3)[1]
        assert set(own) == set(heads(final))  # only the head is personal
        assert max(float(np.abs(own[k] - heads(final)[k]).max()) for k in own) > 1e-3
    # The backbone is aggregated: it moved between rounds.
    first, last = checkpoints[0].arrays, checkpoints[-1].arrays
    assert max(float(np.abs(last[k] - first[k]).max()) for k in first if k.startswith("backbone.") and
               first[k].dtype.kind == "f") > 1e-4  # fmt: skip
    rounds = history(fedper_run)
    for record in rounds[2:]:
        assert {c["personal-from-round"] for c in record["train-clients"]["clients"]} == {record["round"] - 1}
    summary = json.loads((fedper_run / "summary.json").read_text())
    sites = summary["final-sites"]
    assert len(sites["sites"]) == SITES and all("personal-video-accuracy" in s for s in sites["sites"])
    assert sites["personal"]["mean"] >= sites["mean"] + 0.2, sites
    text = (fedper_run / "summary.txt").read_text()
    assert "personal models mean" in text


def test_predict_and_export_take_a_sites_personal_model(fedper_run, tmp_path):
    model, classes, cfg = model_from_checkpoint(fedper_run, site=1)
    own = PersonalStore(fedper_run / "personal" / "site-1").load(3)[1]
    state = model.state_dict()
    for key, value in own.items():
        np.testing.assert_array_equal(state[key].numpy(), value)
    backbone = load_weights(fedper_run / "model.safetensors")
    np.testing.assert_array_equal(state["backbone.blocks.0.0.weight"].numpy(), backbone["backbone.blocks.0.0.weight"])
    with pytest.raises(PersonalStateError, match="site 7"):
        model_from_checkpoint(fedper_run, site=7)
    out = tmp_path / "export"
    result = subprocess.run(
        [sys.executable, "-m", "fedapp.tools.export", str(fedper_run), "--site", "1", "--out", str(out),
         "--samples", "2", "--latency-runs", "1"],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (out / "model.ts").is_file()
    refused = subprocess.run(
        [sys.executable, "-m", "fedapp.tools.predict", str(fedper_run), "--state-dir", str(tmp_path), "x.mp4"],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "needs --site" in refused.stderr


def test_fedrep_trains_its_head_and_sends_only_the_backbones_update(small_run_config, tmp_path):
    run_dir = tmp_path / "run"
    results = run_inprocess(skewed(small_run_config, "fedrep", rounds=2, **{"personal-epochs": 2}), SITES, run_dir)
    first, final = load_checkpoint(list_checkpoints(run_dir)[0]).arrays, load_weights(run_dir / "model.safetensors")
    for key, value in heads(final).items():
        np.testing.assert_array_equal(value, first[key])
    clients = results.rounds[-1]["train-clients"]["clients"]
    assert all(np.isfinite(c["personal-train-loss"]) for c in clients)
    sites = json.loads((run_dir / "summary.json").read_text())["final-sites"]
    assert sites["personal"]["mean"] > sites["mean"], sites


def test_ditto_lambda_pulls_the_personal_model_towards_the_global_one(small_run_config, tmp_path):
    """Ditto's personal model trains beside the global one; a large λ keeps it close to the global
    model, λ = 0 lets it drift (measured on the same seed: same data, same start)."""
    distance = {}
    for lam in (0.0, 10.0):
        run_dir = tmp_path / f"lambda-{lam}"
        run_inprocess(skewed(small_run_config, "ditto", rounds=2, **{"ditto-lambda": lam}), SITES, run_dir)
        sent = load_checkpoint(list_checkpoints(run_dir)[0]).arrays  # the global model round 2 started from
        own = PersonalStore(run_dir / "personal" / "site-0").load(2)[1]
        assert set(own) == set(sent)  # the whole model is personal
        distance[lam] = sum(float(((own[k] - sent[k]) ** 2).sum()) for k in sent if k.endswith(".weight"))
    assert distance[10.0] < 0.5 * distance[0.0], distance


def test_a_resumed_run_continues_each_sites_personal_model(small_run_config, tmp_path):
    run_dir = tmp_path / "run"
    base = skewed(small_run_config, "fedper", **{"min-train-nodes": 2, "min-available-nodes": 2,
                                                  "min-evaluate-nodes": 2, "checkpoint-keep": 2})  # fmt: skip
    run_rounds(base, tmp_path, 2, run_dir)  # "killed" after round 2 of 4
    token = run_token(run_dir)
    before = {s: PersonalStore(run_dir / "personal" / f"site-{s}").load(2)[1] for s in (0, 1)}
    summary, _ = run_rounds({**base, "resume": "latest"}, tmp_path, 4, run_dir)
    rounds = history(run_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4]
    # Round 3 started from each site's round-2 head, not from a fresh one.
    assert {c["personal-from-round"] for c in rounds[3]["train-clients"]["clients"]} == {2}
    for site in (0, 1):
        store = PersonalStore(run_dir / "personal" / f"site-{site}")
        assert store.rounds()[-1] == 4
        after = store.load(4)[1]
        assert max(float(np.abs(after[k] - before[site][k]).max()) for k in after) > 1e-4
    assert summary["final-sites"]["personal"]["sites"] == 2
    assert run_token(run_dir) == token  # the resumed run is the same run to the sites


def test_two_runs_of_one_name_never_share_a_sites_folder(tmp_path):
    """A SuperNode's state-dir (or personal-dir) outlives runs: the run token keeps a new run of
    the same name (another results folder) from continuing an old run's personal models."""
    cfg = parse_config({"personalization": "fedper"}, check_paths=False)
    first, second = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for run_dir in (first, second):
        run_dir.mkdir(parents=True)
    tokens = [run_token(first, create=True), run_token(second, create=True)]
    assert tokens[0] != tokens[1] and run_token(first) == tokens[0]
    folders = {site_folder(cfg, "run", 0, str(tmp_path / "state"), True, t) for t in tokens}
    assert len(folders) == 2 and all(f.parent.parent == tmp_path / "state" for f in folders)
    with pytest.raises(ConfigError, match="state-dir"):
        site_folder(cfg, "run", 0, None, True, tokens[0])  # a site with its own videos must name one
    with pytest.raises(PersonalStateError, match="plain name"):
        site_folder(cfg, "../x", 0, str(tmp_path), False, tokens[0])

"""FLTrust (strategies/defences.fltrust, the fltrust aggregator, fedapp/server/root_set.py) and the
adaptive attack of its paper (strategies/attacks.fltrust_adaptive)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.inprocess import run_inprocess
from bench.robustness import synthetic_root_set
from fedapp.server.root_set import RootTrainer, root_samples
from fedapp.task.config import ConfigError, parse_config
from fedapp.task.data import load_video_index
from strategies.aggregators.fltrust import FLTrust
from strategies.attacks import _fltrust_terms, fltrust_adaptive
from strategies.defences import fltrust
from strategies.strategy import VideoStrategy
from tests.test_defences import PARAMS, prepared, random_models, replies, vec


def fltrust_reference(updates: list[np.ndarray], g0: np.ndarray) -> np.ndarray:
    """Cao et al. (NDSS 2021), Algorithm 1's aggregation, on flat updates."""
    trust = [max(0.0, float(g @ g0) / (np.linalg.norm(g) * np.linalg.norm(g0))) for g in updates]
    scaled = [np.linalg.norm(g0) / np.linalg.norm(g) * g for g in updates]
    return sum(t * s for t, s in zip(trust, scaled)) / sum(trust)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fltrust_equals_the_papers_aggregation(seed):
    rng = np.random.default_rng(seed)
    center, root, *models = random_models(rng, 8, with_bn=True)
    models[0] = {**models[0], **{k: 2 * center[k] - root[k] for k in PARAMS}}  # the reverse of g0: no trust
    merged, scores, root_norm = fltrust(models, center, root)
    g0 = vec(root) - vec(center)
    updates = [vec(m) - vec(center) for m in models]
    np.testing.assert_allclose(vec(merged) - vec(center), fltrust_reference(updates, g0), rtol=1e-4, atol=1e-5)
    assert root_norm == pytest.approx(np.linalg.norm(g0))
    assert scores[0] == 0 and all(s > 0 for s in scores[1:])
    trusted = [s for s in scores if s > 0]
    expected_var = sum(s * m["bn.running_var"] for s, m in zip(scores, models) if s > 0) / sum(trusted)
    np.testing.assert_allclose(merged["bn.running_var"], expected_var, rtol=1e-5)


def test_fltrust_keeps_the_model_when_nothing_is_trusted():
    rng = np.random.default_rng(3)
    center = random_models(rng, 1)[0]
    root = {k: v + 1.0 for k, v in center.items()}
    opposed = [{k: v - s for k, v in center.items()} for s in (1.0, 2.0, 3.0)]
    with pytest.raises(ValueError, match="trusted none"):
        fltrust(opposed, center, root)

    class Root:
        num_videos = 4

        def __call__(self, global_model, server_round):
            return root

    strategy = prepared(VideoStrategy(aggregator=FLTrust(Root()), min_train_nodes=1), center)
    report = strategy.train_round(1, replies(opposed))
    assert report.arrays is None and "trusted none" in report.skipped
    # Boosted sign flips among honest updates get no trust, and the honest ones' size is g0's.
    honest = [{k: v + 0.5 + 0.05 * rng.normal(size=v.shape).astype(v.dtype) for k, v in center.items()}
              for _ in range(4)]  # fmt: skip
    strategy = prepared(VideoStrategy(aggregator=FLTrust(Root()), min_train_nodes=1), center)
    report = strategy.train_round(2, replies([*honest, *[{k: v - 100 for k, v in center.items()}] * 2]))
    assert report.fusion["trust"]["5"] == 0 and report.fusion["trust"]["6"] == 0
    assert report.fusion["root-videos"] == 4
    step = vec(report.arrays) - vec(center)
    assert np.linalg.norm(step) == pytest.approx(np.linalg.norm(vec(root) - vec(center)), rel=0.05)


def test_the_root_set_is_required_named_by_class_and_never_the_test_split(small_run_config, tmp_path):
    with pytest.raises(ConfigError, match="fltrust-root-dir=''"):
        parse_config({"strategy": "fusion", "fusion-fn": "fltrust"}, check_paths=False)
    cfg = parse_config({**small_run_config, "strategy": "fusion", "fusion-fn": "fltrust", "fltrust-root-dir": "x"})
    index = load_video_index(cfg)
    test_video = Path(index.test[0].path)
    leak = tmp_path / "leak" / index.classes[index.test[0].label]
    leak.mkdir(parents=True)
    (leak / test_video.name).symlink_to(test_video)
    with pytest.raises(ConfigError, match="test videos"):
        root_samples(dataclasses.replace(cfg, fltrust_root_dir=str(tmp_path / "leak")), index)
    (tmp_path / "odd" / "NotAClass").mkdir(parents=True)
    with pytest.raises(ConfigError, match="NotAClass"):
        root_samples(dataclasses.replace(cfg, fltrust_root_dir=str(tmp_path / "odd")), index)


def test_in_a_run_no_client_moves_the_model_further_than_the_root_update(small_run_config, tmp_path):
    """FLTrust in the round loop against a boosted sign-flipper (×10): every round records the root
    set's size and a trust score per client, and the global model moves by at most the norm of the
    server's own root-set update, however large the attacker's update."""
    from fedapp.server.checkpoint import list_checkpoints, load_checkpoint
    from strategies.defences import update_norm

    base = parse_config(small_run_config)
    root = synthetic_root_set(base, 3)
    config = {**small_run_config, "num-server-rounds": 2, "strategy": "fusion", "fusion-fn": "fltrust",
              "fltrust-root-dir": str(root), "min-train-nodes": 4, "min-available-nodes": 4, "tensorboard": False,
              "attack": "sign-flip", "attack-fraction": 0.25, "attack-scale": 10.0}  # fmt: skip
    results = run_inprocess(config, 4, tmp_path / "run")
    models = [load_checkpoint(p).arrays for p in list_checkpoints(tmp_path / "run")]
    for record, before, after in zip(results.rounds[2:], models, models[1:]):
        fusion = record["fusion"]
        assert fusion["root-videos"] == 3 * base.synthetic_classes
        assert len(fusion["trust"]) == 4 and all(0.0 <= t <= 1.0 for t in fusion["trust"].values())
        assert update_norm(after, before) <= fusion["root-update-norm"] * (1 + 1e-4)
        clients = record["train-clients"]["clients"]
        assert len(clients) == 4 and any(c.get("partition-id") == 0 for c in clients)  # the attacker took part


def test_the_root_trainer_is_seeded_per_round_and_serves_a_round_once(small_run_config):
    cfg = parse_config({**small_run_config, "strategy": "fusion", "fusion-fn": "fltrust",
                        "fltrust-root-dir": str(synthetic_root_set(parse_config(small_run_config), 2))})  # fmt: skip
    index = load_video_index(cfg)
    from fedapp.server.app import initial_model

    model = {k: v.numpy() for k, v in initial_model(cfg, len(index.classes)).state_dict().items()}
    cpu = torch.device("cpu")
    trainer = RootTrainer(cfg, len(index.classes), root_samples(cfg, index), cpu)
    first = trainer(model, 1)
    assert trainer(model, 1) is first  # the attack and the rule of one round share the update
    again = RootTrainer(cfg, len(index.classes), root_samples(cfg, index), cpu)(dict(model), 1)
    assert all(np.array_equal(first[k], again[k]) for k in first)  # seeded: the same update
    assert any(not np.array_equal(first[k], model[k]) for k in first)  # and it trained
    later = trainer(model, 2)
    assert any(not np.array_equal(first[k], later[k]) for k in first)  # another round, another clip order


def test_the_adaptive_attack_moves_fltrust_further_than_a_trusted_reversal():
    """The attack's deviation of FLTrust's aggregate beats the best of the simple directions it
    starts from, while its cosine with g₀ stays positive (it stays trusted)."""
    rng = np.random.default_rng(5)
    d = 400
    g0 = rng.normal(size=d)
    honest = g0 + 1.5 * rng.normal(size=(10, d))
    attackers = [0, 1, 2]
    forged, info = fltrust_adaptive(honest, attackers, g0)
    assert info["cosine"] > 0 and info["ascent-steps"] > 0
    num, den = _fltrust_terms(honest, g0)
    target = num / den

    def deviation(update: np.ndarray) -> float:
        rows = honest.copy()
        rows[attackers] = update
        n, dd = _fltrust_terms(rows, g0)
        return float(np.linalg.norm(n / dd - target))

    assert deviation(forged) == pytest.approx(info["deviation"], rel=1e-6)
    u = g0 / np.linalg.norm(g0)
    away = -(target - (target @ u) * u)
    away /= np.linalg.norm(away)
    simple = max(deviation(np.linalg.norm(g0) * (c * u + np.sqrt(1 - c * c) * away)) for c in (0.02, 0.1, 0.3, 0.6))
    assert deviation(forged) > 1.05 * simple
    # Reversing g0 earns no trust: the aggregate is the honest clients' alone, a much smaller deviation.
    assert deviation(-g0) < 0.5 * deviation(forged)


def test_the_adaptive_attack_stays_trusted_in_a_run_and_needs_fltrust(small_run_config, tmp_path):
    base = parse_config(small_run_config)
    config = {**small_run_config, "num-server-rounds": 2, "strategy": "fusion", "fusion-fn": "fltrust",
              "fltrust-root-dir": str(synthetic_root_set(base, 3)), "min-train-nodes": 4, "min-available-nodes": 4,
              "tensorboard": False, "attack": "fltrust-adaptive", "attack-fraction": 0.5}  # fmt: skip
    results = run_inprocess(config, 4, tmp_path / "run")
    for record in results.rounds[1:]:
        fusion = record["fusion"]
        attack = fusion["attack"]
        assert len(attack["attacker-nodes"]) == 2 and attack["cosine"] > 0 and attack["ascent-steps"] > 0
        assert all(fusion["trust"][str(node)] > 0 for node in attack["attacker-nodes"])  # trusted, as designed
    median = {**{k: v for k, v in config.items() if k != "fltrust-root-dir"}, "fusion-fn": "median"}
    with pytest.raises(ValueError, match="is FLTrust's own adaptive attack"):
        run_inprocess(median, 4, tmp_path / "refused")

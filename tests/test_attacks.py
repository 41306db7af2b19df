"""The attack test tool: omniscient colluding attacks (ALIE, IPM, min-max / min-sum) on hand-made
examples, their server-side stage, the free rider, the tool's keys (bench/attacks.py; never the
app's) and one in-process run."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from bench.attacks import AttackerClient, AttackPlan, make_attacking_client, split_attack
from bench.inprocess import run_inprocess
from fedapp.server.build_strategy import build_strategy
from fedapp.task.config import ConfigError, parse_config
from fedapp.task.data import load_video_index
from fedapp.task.models import build_model
from fedapp.task.train import state_arrays
from strategies.aggregators.krum import Krum
from strategies.attacks import ColludingAttack, alie, alie_z_max, ipm, malicious_update, min_max_or_sum
from strategies.fusion import is_parameter
from strategies.stage import Transform
from strategies.strategy import VideoStrategy
from tests.flower_messages import reply


def test_alie_z_max_follows_the_paper():
    # s = floor(n/2 + 1) - f, z = Φ⁻¹((n - s)/n)
    assert alie_z_max(12, 4) == pytest.approx(0.6744897, abs=1e-6)  # s = 3: Φ⁻¹(0.75)
    assert alie_z_max(4, 1) == pytest.approx(0.0, abs=1e-12)  # s = 2: Φ⁻¹(0.5)
    assert alie_z_max(10, 2) == pytest.approx(0.2533471, abs=1e-6)  # s = 4: Φ⁻¹(0.6)
    assert alie_z_max(3, 2) == pytest.approx(0.4307273, abs=1e-6)  # attackers a majority: s = 1


def test_alie_is_mean_minus_z_std():
    honest = np.array([[1.0, 0.0], [3.0, 4.0]])  # unbiased std: √2, √8
    np.testing.assert_allclose(alie(honest, 1.0), [2 - math.sqrt(2), 2 - math.sqrt(8)])
    update, used = malicious_update("alie", honest, num_clients=12, num_attackers=4)
    assert used["z"] == pytest.approx(0.6744897, abs=1e-6)
    np.testing.assert_allclose(update, alie(honest, used["z"]))
    assert malicious_update("alie", honest, 12, 4, z=2.0)[1] == {"z": 2.0}  # attack-z overrides


def test_ipm_is_minus_epsilon_times_the_mean():
    honest = np.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(ipm(honest, 0.5), [-1.0, -1.5])
    np.testing.assert_allclose(malicious_update("ipm", honest, 3, 1, epsilon=100.0)[0], [-200.0, -300.0])


def test_min_max_and_min_sum_take_the_largest_gamma_within_the_bound():
    # Honest (0,0), (2,0), (0,2): mean 2/3, unbiased std 2/√3 per coordinate, so the malicious
    # update is (t, t) with t = 2/3 − γ·2/√3. Farthest honest update: (2,0) or (0,2).
    honest = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    std = 2 / math.sqrt(3)
    # min-max: (t−2)² + t² ≤ max pairwise 8  →  t ≥ 1 − √3
    update, gamma = min_max_or_sum(honest, "min-max")
    t = 1 - math.sqrt(3)
    assert gamma == pytest.approx((2 / 3 - t) / std, abs=1e-4)
    np.testing.assert_allclose(update, [t, t], atol=1e-4)
    # min-sum: 2t² + 2((t−2)² + t²) ≤ max_i Σ_j ‖h_i − h_j‖² = 12  →  6t² − 8t − 4 ≤ 0
    update, gamma = min_max_or_sum(honest, "min-sum")
    t = (8 - math.sqrt(64 + 96)) / 12
    np.testing.assert_allclose(update, [t, t], atol=1e-4)
    assert np.max(np.sum((honest - update) ** 2, axis=1)) <= 8 + 1e-9  # the bound holds at the γ kept


GLOBAL = {
    "conv.weight": np.zeros(2, np.float32),
    "bn.running_mean": np.zeros(2, np.float32),
    "bn.num_batches_tracked": np.array(0, np.int64),
}


def model(w, mean, tracked=1):
    return {
        "conv.weight": np.asarray(w, np.float32),
        "bn.running_mean": np.asarray(mean, np.float32),
        "bn.num_batches_tracked": np.array(tracked, np.int64),
    }


def replies():
    return [
        reply(1, model([1, 0], [0.1, 0.1]), {"num-examples": 10}),
        reply(2, model([3, 4], [0.2, 0.2]), {"num-examples": 10}),
        reply(3, model([9, 9], [5.0, 5.0]), {"num-examples": 10, "attacker": 1}),
        reply(4, model([9, 9], [6.0, 6.0]), {"num-examples": 10, "attacker": 1}),
    ]


class Recorder(Transform):
    """Keeps the models the aggregator is given (after every other transform), changing nothing."""

    name = "recorder"
    order = 100

    def __init__(self) -> None:
        self.models: dict[int, dict[str, np.ndarray]] = {}

    def apply(self, updates, ctx):
        self.models = {u.nodes[0]: u.model for u in updates}
        return updates


def test_train_round_replaces_marked_replies_by_the_attack():
    aggregated = Recorder()
    strategy = VideoStrategy(transforms=[ColludingAttack("alie", z=1.0), aggregated])
    strategy.set_global(GLOBAL)
    report = strategy.train_round(1, replies())
    expected = [2 - math.sqrt(2), 2 - math.sqrt(8)]  # from the two honest deltas only
    for node, own_mean in ((3, 5.0), (4, 6.0)):
        sent = aggregated.models[node]
        np.testing.assert_allclose(sent["conv.weight"], expected, rtol=1e-6)
        assert sent["conv.weight"].dtype == np.float32
        np.testing.assert_array_equal(sent["bn.running_mean"], [own_mean] * 2)  # statistics: its own
    np.testing.assert_allclose(aggregated.models[1]["conv.weight"], [1, 0])  # honest ones untouched
    np.testing.assert_allclose(aggregated.models[2]["conv.weight"], [3, 4])
    np.testing.assert_allclose(report.arrays["conv.weight"], (np.array([4.0, 4.0]) + 2 * np.array(expected)) / 4)
    assert report.fusion["attack"] == {"name": "alie", "attacker-nodes": [3, 4], "z": 1.0}
    assert "attacker" not in report.metrics  # a per-client mark, never averaged


def test_fusion_keeps_its_own_info_beside_the_attack():
    aggregated = Recorder()
    strategy = VideoStrategy(Krum(1), transforms=[ColludingAttack("ipm", epsilon=0.5), aggregated])
    strategy.set_global(GLOBAL)
    report = strategy.train_round(1, replies())
    np.testing.assert_allclose(aggregated.models[4]["conv.weight"], [-1.0, -1.0])  # −0.5 × mean (2, 2)
    assert report.fusion["attack"]["attacker-nodes"] == [3, 4] and "selected-nodes" in report.fusion


def test_no_injector_no_change():
    strategy = VideoStrategy()
    strategy.set_global(GLOBAL)
    report = strategy.train_round(1, replies())
    # The marked replies enter the mean as sent: (1 + 3 + 9 + 9) / 4, (0 + 4 + 9 + 9) / 4.
    np.testing.assert_allclose(report.arrays["conv.weight"], [5.5, 5.5])
    assert "attack" not in report.fusion


def test_a_free_riders_zero_update_is_rejected_by_screening():
    strategy = VideoStrategy()
    strategy.set_global(GLOBAL)
    report = strategy.screen(1, [reply(1, dict(GLOBAL), {"num-examples": 5})], with_arrays=True)
    assert not report.accepted
    assert [r["node-id"] for r in report.rejected] == [1]
    assert "free rider" in report.rejected[0]["reason"]


def test_the_tools_keys_stay_out_of_the_apps_config(small_run_config):
    """The app has no attack key: a real federation cannot name one; the in-process federation
    takes the tool's keys out of what it is given and builds the plan and the server stage."""
    with pytest.raises(ConfigError, match="unknown key 'attack'"):
        parse_config({**small_run_config, "attack": "alie", "attack-fraction": 0.34})
    plan, run_config = split_attack({**small_run_config, "attack": "alie", "attack-fraction": 0.34, "attack-z": 1.5})
    assert plan == AttackPlan("alie", 0.34, z=1.5) and run_config == small_run_config
    (attack,) = build_strategy(parse_config(run_config), extra_transforms=plan.server_stages()).transforms
    assert isinstance(attack, ColludingAttack) and attack.attack == "alie" and attack.z == 1.5
    assert split_attack(small_run_config) == (None, small_run_config)
    assert AttackPlan("free-rider", 0.34).server_stages() == []  # a client-side attack
    for bad in ({"attack": "ddos", "attack-fraction": 0.5}, {"attack": "alie"}, {"attack-fraction": 0.5},
                {"attack": "ipm", "attack-fraction": 0.5, "attack-epsilon": 0.0}):  # fmt: skip
        with pytest.raises(ValueError):
            split_attack(bad)
    with pytest.raises(ValueError, match="0 clients attack"):
        AttackPlan("noise", 0.1).check(3, parse_config(small_run_config))
    with pytest.raises(ValueError, match="is not simulated with dp="):
        AttackPlan("min-max", 0.5).check(3, parse_config({**small_run_config, "dp": "server-side"}))
    for attack in ("label-flip", "alie"):  # client-side and omniscient alike: the server sees no single update
        with pytest.raises(ValueError, match="is not simulated with secagg=true"):
            AttackPlan(attack, 0.5).check(3, parse_config({**small_run_config, "secagg": True}))


def test_free_rider_sends_the_global_model_back(small_run_config):
    cfg = parse_config(small_run_config)
    client = make_attacking_client(AttackPlan("free-rider", 0.5), cfg, {"partition-id": 0, "num-partitions": 2})
    initial = state_arrays(build_model(cfg.model, len(load_video_index(cfg).classes)))
    arrays, count, metrics = client.fit(initial, {"server-round": 1})
    assert count > 0 and "attacker" not in metrics
    for sent, start in zip(arrays, initial):
        np.testing.assert_array_equal(sent, start)


def test_omniscient_attacker_marks_its_reply(small_run_config):
    cfg, plan = parse_config(small_run_config), AttackPlan("min-max", 0.5)
    client = make_attacking_client(plan, cfg, {"partition-id": 0, "num-partitions": 2})
    assert isinstance(client, AttackerClient)
    initial = state_arrays(build_model(cfg.model, len(client.classes)))
    _, _, metrics = client.fit(initial, {"server-round": 1})
    assert metrics["attacker"] == 1
    assert not isinstance(make_attacking_client(plan, cfg, {"partition-id": 1, "num-partitions": 2}), AttackerClient)


def test_inprocess_alie_attacker_sends_the_alie_model(small_run_config, tmp_path, monkeypatch):
    seen = {}
    original = ColludingAttack.forge

    def spy(self, updates, start, server_round=0):
        seen["before"] = copy.deepcopy([(u.nodes[0], dict(u.metrics), u.model) for u in updates])
        seen["start"] = {k: v.copy() for k, v in start.items()}
        info = original(self, updates, start, server_round)
        seen["after"] = {u.nodes[0]: u.model for u in updates}
        return info

    monkeypatch.setattr(ColludingAttack, "forge", spy)
    run_config = {
        **small_run_config,
        "num-server-rounds": 1,
        "min-train-nodes": 3,
        "min-available-nodes": 3,
        "fraction-evaluate": 0.0,
        "central-eval": False,
        "tensorboard": False,
        "attack": "alie",
        "attack-fraction": 0.34,  # round(0.34 × 3) = 1: partition 0, node 1
    }
    results = run_inprocess(run_config, 3, tmp_path / "run")
    attack = next(r for r in results.rounds if r["round"] == 1)["fusion"]["attack"]
    assert attack["attacker-nodes"] == [1] and attack["z"] == pytest.approx(alie_z_max(3, 1))
    start = seen["start"]
    keys = [k for k, v in start.items() if is_parameter(k, v)]
    honest = [arrays for node, metrics, arrays in seen["before"] if not metrics.get("attacker")]
    assert len(honest) == 2
    rows = np.stack([np.concatenate([(h[k].astype(np.float64) - start[k]).ravel() for k in keys]) for h in honest])
    expected = alie(rows, alie_z_max(3, 1))
    sent = seen["after"][1]
    got = np.concatenate([(sent[k].astype(np.float64) - start[k]).ravel() for k in keys])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    own = next(arrays for node, _, arrays in seen["before"] if node == 1)
    for k in start.keys() - set(keys):  # BatchNorm statistics: the attacker's honest ones
        np.testing.assert_array_equal(sent[k], own[k])
    assert any("running" in k for k in start.keys() - set(keys))

"""FedProx, FedBN and the attack test tool (bench/attacks.py) on the client side."""

import numpy as np
import pytest

from bench.attacks import AttackerClient, AttackPlan, make_attacking_client, poison_update
from fedapp.client.app import make_client, node_weight
from fedapp.task.config import ConfigError, parse_config
from fedapp.task.data import load_video_index
from fedapp.task.models import batchnorm_state_keys, build_model
from fedapp.task.train import state_arrays


@pytest.fixture(scope="module")
def setup(small_run_config):
    cfg = parse_config(small_run_config)
    index = load_video_index(cfg)
    model = build_model(cfg.model, len(index.classes))
    return small_run_config, model, state_arrays(model)


def distance(a, b):
    return sum(float(np.sum((x.astype(np.float64) - y) ** 2)) for x, y in zip(a, b) if x.dtype.kind == "f")


def test_attackers_are_the_first_fraction_of_partitions():
    assert [AttackPlan("noise", 0.3).attacks(p, 10) for p in range(10)] == [True] * 3 + [False] * 7
    with pytest.raises(ValueError, match="attack-fraction"):
        AttackPlan("noise", 0.0)


def test_a_label_flipper_trains_on_labels_reversed(setup):
    run_config, _, _ = setup
    cfg = parse_config(run_config)
    honest = make_client(cfg, {"partition-id": 0, "num-partitions": 2})
    flipper = make_attacking_client(AttackPlan("label-flip", 0.5), cfg, {"partition-id": 0, "num-partitions": 2})
    last = len(honest.classes) - 1
    assert [s.label for s in flipper.train_samples] == [last - s.label for s in honest.train_samples]
    assert [s.path for s in flipper.train_samples] == [s.path for s in honest.train_samples]


def test_poisoned_updates():
    rng = np.random.default_rng(0)
    start = [np.zeros((2, 2), np.float32), np.array(3, np.int64)]
    trained = [np.ones((2, 2), np.float32), np.array(5, np.int64)]
    flipped = poison_update(start, trained, "sign-flip", 10.0, rng)
    np.testing.assert_array_equal(flipped[0], -10 * np.ones((2, 2)))
    assert flipped[0].dtype == np.float32 and flipped[1] == 5
    noisy = poison_update(start, [np.array([[1, 2], [3, 4]], np.float32), trained[1]], "noise", 10.0, rng)
    assert noisy[0].std() > 1.0
    with pytest.raises(ValueError):
        poison_update(start, trained, "label-flip", 1.0, rng)


def test_sign_flip_client_sends_the_reversed_update(setup):
    run_config, _, initial = setup
    cfg, plan = parse_config(run_config), AttackPlan("sign-flip", 0.5, scale=10.0)
    honest = make_client(cfg, {"partition-id": 0, "num-partitions": 2})
    attacker = make_attacking_client(plan, cfg, {"partition-id": 0, "num-partitions": 2})
    assert isinstance(attacker, AttackerClient) and not isinstance(honest, AttackerClient)
    assert not isinstance(make_attacking_client(plan, cfg, {"partition-id": 1, "num-partitions": 2}), AttackerClient)
    honest_arrays, _, _ = honest.fit(initial, {"server-round": 1})
    evil_arrays, _, _ = attacker.fit(initial, {"server-round": 1})
    # same data and seed: on learnable parameters the attacker's step is -10 × the honest step;
    # BatchNorm running statistics are sent as trained (a negative variance would be rejected)
    model = build_model(cfg.model, len(honest.classes))
    learnable = {name for name, _ in model.named_parameters()}
    for key, start, good, evil in zip(model.state_dict(), initial, honest_arrays, evil_arrays):
        if key in learnable:
            np.testing.assert_allclose(evil - start, -10 * (good - start), rtol=1e-3, atol=1e-5)
        else:
            np.testing.assert_array_equal(evil, good)


def test_fedprox_keeps_the_local_model_near_the_global_one(setup):
    run_config, _, initial = setup
    cfg = parse_config({**run_config, "local-epochs": 2})
    free, _, _ = make_client(cfg, {"partition-id": 0, "num-partitions": 2}).fit(initial, {"server-round": 1})
    prox, _, _ = make_client(cfg, {"partition-id": 0, "num-partitions": 2}).fit(
        initial, {"server-round": 1, "proximal-mu": 100.0}
    )
    assert distance(prox, initial) < 0.5 * distance(free, initial)


def test_fedbn_keeps_batchnorm_local(setup):
    run_config, model, initial = setup
    cfg = parse_config({**run_config, "fedbn": True})
    local_state: dict = {}
    client = make_client(cfg, {"partition-id": 0, "num-partitions": 2}, local_state)
    trained, _, _ = client.fit(initial, {"server-round": 1})
    bn_keys = batchnorm_state_keys(model)
    assert bn_keys and set(local_state) == set(bn_keys)
    keys = list(model.state_dict())
    # next round: the global BatchNorm tensors are replaced by this node's own
    named = dict(zip(keys, initial))
    merged = client._with_local_batchnorm(named)
    for key, start in named.items():
        expected = local_state[key] if key in local_state else start
        np.testing.assert_array_equal(merged[key], expected)
    without = make_client(parse_config(run_config), {"partition-id": 0, "num-partitions": 2})
    assert without._with_local_batchnorm(named) is named


def test_client_momentum_sends_the_running_average_of_updates(setup):
    run_config, model, initial = setup
    cfg = parse_config({**run_config, "client-momentum": 0.5})
    plain = make_client(parse_config(run_config), {"partition-id": 0, "num-partitions": 2})
    state: dict = {}
    client = make_client(cfg, {"partition-id": 0, "num-partitions": 2}, state)
    learnable = {name for name, _ in model.named_parameters()}
    keys = list(model.state_dict())
    # Round 1: m = the update itself, so the reply is what a client without momentum sends.
    first, _, _ = client.fit(initial, {"server-round": 1})
    for a, b in zip(first, plain.fit(initial, {"server-round": 1})[0]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Round 2 from a new global model: start + 0.5·m₁ + 0.5·Δ₂ on learnable tensors, statistics as trained.
    start2 = [a.copy() for a in first]
    sent, _, _ = make_client(cfg, {"partition-id": 0, "num-partitions": 2}, state).fit(start2, {"server-round": 2})
    trained2, _, _ = plain.fit(start2, {"server-round": 2})
    changed = 0
    for key, s0, s2, m_sent, t2 in zip(keys, initial, start2, sent, trained2):
        if key in learnable:
            expected = s2 + 0.5 * (s2 - s0) + 0.5 * (t2 - s2)
            np.testing.assert_allclose(m_sent, expected, rtol=1e-4, atol=1e-5)
            changed += int(not np.allclose(m_sent, t2, atol=1e-6))
        else:
            np.testing.assert_array_equal(m_sent, t2)
    assert changed > 0  # momentum did change the reply
    assert {k for k in state if k.startswith("client-momentum/")} == {"client-momentum/" + k for k in learnable}


def test_client_momentum_persists_in_flower_node_state(small_run_config, tmp_path):
    from bench.inprocess import InProcessGrid
    from fedapp.client.app import LOCAL_STATE_KEY
    from fedapp.server.app import run_federation
    from fedapp.server.results import RunResults, WriterLock

    run_config = {
        **small_run_config,
        "num-server-rounds": 2,
        "min-train-nodes": 2,
        "min-available-nodes": 2,
        "fraction-evaluate": 0.0,
        "central-eval": False,
        "tensorboard": False,
        "client-momentum": 0.5,
    }
    grid = InProcessGrid(run_config, 2)
    with WriterLock(tmp_path / "run"):
        run_federation(grid, parse_config(run_config), RunResults(tmp_path / "run"), checkpoint=None)
    for context in grid.contexts.values():
        stored = context.state.array_records[LOCAL_STATE_KEY]
        assert stored and all(key.startswith("client-momentum/") for key in stored)


def test_sign_flip_attacker_with_client_momentum_flips_its_momentum(setup):
    run_config, model, initial = setup
    honest_cfg = parse_config({**run_config, "client-momentum": 0.5})
    plan = AttackPlan("sign-flip", 0.5)
    learnable = {name for name, _ in model.named_parameters()}
    honest_state: dict = {}
    evil_state: dict = {}
    for server_round, start in ((1, initial), (2, [a * 0.9 for a in initial])):
        good, _, _ = make_client(honest_cfg, {"partition-id": 0, "num-partitions": 2}, honest_state).fit(
            start, {"server-round": server_round}
        )
        evil, _, _ = make_attacking_client(plan, honest_cfg, {"partition-id": 0, "num-partitions": 2}, evil_state).fit(
            start, {"server-round": server_round}
        )
        for key, s, g, e in zip(model.state_dict(), start, good, evil):
            if key in learnable:  # the attacker's reply is −10 × the honest momentum
                np.testing.assert_allclose(e - s, -10 * (g - s), rtol=1e-3, atol=1e-4)


def test_node_weight_is_validated_and_reported(setup):
    run_config, _, initial = setup
    assert node_weight({"weight": 2}) == 2.0 and node_weight({}) is None
    with pytest.raises(ConfigError, match="weight"):
        node_weight({"weight": -1})
    client = make_client(parse_config(run_config), {"partition-id": 0, "num-partitions": 2, "weight": 3.5})
    _, _, metrics = client.fit(initial, {"server-round": 4})
    assert metrics["node-weight"] == 3.5 and metrics["base-round"] == 4

"""FedProx, FedBN and the attack test tool on the client side."""

import numpy as np
import pytest
import torch

from fedapp.client.app import make_client, node_weight
from fedapp.client.attacks import flipped_labels, is_attacker, poison_update
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
    assert [is_attacker(p, 10, 0.3) for p in range(10)] == [True] * 3 + [False] * 7
    assert not any(is_attacker(p, 10, 0.0) for p in range(10))


def test_poisoned_updates():
    rng = np.random.default_rng(0)
    start = [np.zeros((2, 2), np.float32), np.array(3, np.int64)]
    trained = [np.ones((2, 2), np.float32), np.array(5, np.int64)]
    flipped = poison_update(start, trained, "sign-flip", 10.0, rng)
    np.testing.assert_array_equal(flipped[0], -10 * np.ones((2, 2)))
    assert flipped[0].dtype == np.float32 and flipped[1] == 5
    noisy = poison_update(start, [np.array([[1, 2], [3, 4]], np.float32), trained[1]], "noise", 10.0, rng)
    assert noisy[0].std() > 1.0
    assert torch.equal(flipped_labels(8)(torch.tensor([0, 1, 7])), torch.tensor([7, 6, 0]))
    with pytest.raises(ValueError):
        poison_update(start, trained, "label-flip", 1.0, rng)


def test_sign_flip_client_sends_the_reversed_update(setup):
    run_config, _, initial = setup
    cfg = parse_config({**run_config, "attack": "sign-flip", "attack-fraction": 0.5, "attack-scale": 10.0})
    honest = make_client(parse_config(run_config), {"partition-id": 0, "num-partitions": 2})
    attacker = make_client(cfg, {"partition-id": 0, "num-partitions": 2})
    assert attacker.attack == "sign-flip" and honest.attack == "none"
    assert make_client(cfg, {"partition-id": 1, "num-partitions": 2}).attack == "none"
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


def test_node_weight_is_validated_and_reported(setup):
    run_config, _, initial = setup
    assert node_weight({"weight": 2}) == 2.0 and node_weight({}) is None
    with pytest.raises(ConfigError, match="weight"):
        node_weight({"weight": -1})
    client = make_client(parse_config(run_config), {"partition-id": 0, "num-partitions": 2, "weight": 3.5})
    _, _, metrics = client.fit(initial, {"server-round": 4})
    assert metrics["node-weight"] == 3.5 and metrics["base-round"] == 4

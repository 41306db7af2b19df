"""Server optimizers (strategies/server_optimizer.py): FedAvgM and FedAdam / FedYogi / FedAdagrad,
the adaptive ones against Flower's own strategies."""

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedYogi

from fedapp.server.checkpoint import decode_state, encode_state
from strategies.server_optimizer import adaptive_step, server_step
from strategies.server_steps.adagrad import Adagrad
from strategies.server_steps.adam import Adam
from strategies.server_steps.yogi import Yogi
from strategies.strategy import VideoStrategy
from tests.flower_messages import reply


def models():
    current = {"w": np.zeros(3, np.float32), "n": np.array(4, np.int64)}
    aggregate = {"w": np.ones(3, np.float32), "n": np.array(6, np.int64)}
    return current, aggregate


def test_defaults_return_the_aggregate():
    current, aggregate = models()
    new, velocity = server_step(current, aggregate, None)
    np.testing.assert_array_equal(new["w"], aggregate["w"])
    assert velocity is None


def test_server_lr_scales_the_pseudo_gradient():
    current, aggregate = models()
    new, _ = server_step(current, aggregate, None, lr=0.5)
    np.testing.assert_allclose(new["w"], 0.5)
    assert new["w"].dtype == np.float32
    assert new["n"] == 6 and new["n"].dtype == np.int64


def test_momentum_accumulates_like_flower_fedavgm():
    current, aggregate = models()
    new1, v1 = server_step(current, aggregate, None, lr=1.0, momentum=0.9)
    np.testing.assert_allclose(new1["w"], 1.0)
    # the same pseudo-gradient again: velocity = 0.9 * 1 + 1 = 1.9
    new2, v2 = server_step(new1, {"w": new1["w"] + 1, "n": aggregate["n"]}, v1, lr=1.0, momentum=0.9)
    np.testing.assert_allclose(v2["w"], 1.9)
    np.testing.assert_allclose(new2["w"], 2.9)
    assert v2["w"].dtype == current["w"].dtype == np.float32  # state in the parameter's dtype


def test_batchnorm_running_statistics_take_the_aggregate_not_a_momentum_step():
    """A momentum step on running_var overshoots below zero (the model then turns NaN)."""
    current = {
        "bn.running_var": np.array([1.0, 1.0], np.float32),
        "bn.running_mean": np.zeros(2, np.float32),
        "bn.weight": np.ones(2, np.float32),
    }
    aggregate = {
        "bn.running_var": np.array([0.1, 0.2], np.float32),
        "bn.running_mean": np.ones(2, np.float32),
        "bn.weight": np.full(2, 0.5, np.float32),
    }
    velocity = {k: np.full(2, -2.0) for k in current}
    new, new_velocity = server_step(current, aggregate, velocity, lr=1.0, momentum=0.9)
    np.testing.assert_array_equal(new["bn.running_var"], aggregate["bn.running_var"])
    np.testing.assert_array_equal(new["bn.running_mean"], aggregate["bn.running_mean"])
    np.testing.assert_allclose(new["bn.weight"], 1.0 + (0.9 * -2.0 - 0.5))  # parameters do take the step
    assert set(new_velocity) == {"bn.weight"}


# --- adaptive server optimizers: the same numbers as Flower's own strategies ---------------------

FLOWER = {"adam": FedAdam, "yogi": FedYogi, "adagrad": FedAdagrad}


def random_model(rng, scale=1.0):
    return {
        "conv.weight": (scale * rng.normal(size=(4, 3, 3))).astype(np.float32),
        "fc.bias": (scale * rng.normal(size=(5,))).astype(np.float32),
    }


@pytest.mark.parametrize("optimizer", ["adam", "yogi", "adagrad"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adaptive_steps_equal_flowers_strategies_over_rounds(optimizer, seed):
    """Five rounds of random replies with unequal sample counts through our strategy and Flower's
    FedAdam / FedYogi / FedAdagrad: the same global model every round (state carried)."""
    rng = np.random.default_rng(seed)
    eta, beta1, beta2, tau = 0.05, 0.8, 0.95, 1e-2
    kwargs = {"eta": eta, "tau": tau} | ({} if optimizer == "adagrad" else {"beta_1": beta1, "beta_2": beta2})
    flower = FLOWER[optimizer](min_available_nodes=1, min_train_nodes=1, **kwargs)
    steps = {
        "adam": Adam(eta, beta1, beta2, tau),
        "yogi": Yogi(eta, beta1, beta2, tau),
        "adagrad": Adagrad(eta, tau=tau),  # no first-moment decay: no betas, as Flower's FedAdagrad
    }
    ours = VideoStrategy(server_step=steps[optimizer], min_available_nodes=1, min_train_nodes=1)
    current = random_model(rng)
    for server_round in range(1, 6):
        replies = [(random_model(rng, 0.3), int(n)) for n in rng.integers(1, 50, size=4)]
        replies = [({k: current[k] + v for k, v in delta.items()}, n) for delta, n in replies]
        flower.current_arrays = {k: v.copy() for k, v in current.items()}
        expected, _ = flower.aggregate_train(
            server_round, [reply(i + 1, m, {"num-examples": n}) for i, (m, n) in enumerate(replies)]
        )
        ours.set_global(current)
        report = ours.train_round(
            server_round, [reply(i + 1, m, {"num-examples": n}) for i, (m, n) in enumerate(replies)]
        )
        for key in current:
            np.testing.assert_allclose(report.arrays[key], expected[key].numpy(), rtol=1e-5, atol=1e-6)
        current = report.arrays


def test_adaptive_steps_leave_batchnorm_buffers_to_the_aggregate():
    current = {
        "w": np.zeros(3, np.float32),
        "bn.running_var": np.ones(2, np.float32),
        "bn.num_batches_tracked": np.array(4, np.int64),
    }
    aggregate = {
        "w": np.ones(3, np.float32),
        "bn.running_var": np.full(2, 0.5, np.float32),
        "bn.num_batches_tracked": np.array(6, np.int64),
    }
    for optimizer in ("adam", "yogi", "adagrad"):
        new, moments = adaptive_step(current, aggregate, None, 1, optimizer, lr=0.1)
        np.testing.assert_array_equal(new["bn.running_var"], aggregate["bn.running_var"])
        assert new["bn.num_batches_tracked"] == 6 and new["bn.num_batches_tracked"].dtype == np.int64
        assert set(moments["m"]) == {"w"} and new["w"].dtype == np.float32
        assert moments["m"]["w"].dtype == moments["v"]["w"].dtype == np.float32  # the parameter's dtype
        assert np.all(new["w"] > 0)  # a step towards the aggregate


def test_adaptive_moments_survive_a_checkpoint_round_trip():
    """Resuming must continue the moments, not restart them from zero."""
    rng = np.random.default_rng(3)
    strategy = VideoStrategy(server_step=Adam(0.1), min_available_nodes=1, min_train_nodes=1)
    current = random_model(rng)
    strategy.set_global(current)
    strategy.train_round(1, [reply(1, random_model(rng), {"num-examples": 3})])
    arrays, plain = encode_state(strategy.state())
    resumed = VideoStrategy(server_step=Adam(0.1), min_available_nodes=1, min_train_nodes=1)
    resumed.load_state(decode_state(plain, arrays))
    nxt = random_model(rng)
    for s in (strategy, resumed):
        s.set_global(current)
    a = strategy.train_round(2, [reply(1, nxt, {"num-examples": 3})]).arrays
    b = resumed.train_round(2, [reply(1, nxt, {"num-examples": 3})]).arrays
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    fresh = VideoStrategy(server_step=Adam(0.1), min_available_nodes=1, min_train_nodes=1)
    fresh.set_global(current)
    c = fresh.train_round(2, [reply(1, nxt, {"num-examples": 3})]).arrays
    assert not np.allclose(a["fc.bias"], c["fc.bias"])  # the moments matter

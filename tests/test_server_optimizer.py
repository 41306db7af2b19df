import numpy as np

from strategies.server_optimizer import server_step


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

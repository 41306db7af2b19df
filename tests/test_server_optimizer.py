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

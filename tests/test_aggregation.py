import numpy as np
import pytest

from strategies.aggregation import BLOCK, fedavg, weighted_average
from strategies.validation import check_update, reference_spec


def random_updates(rng, n=4):
    return [
        {
            "w": rng.normal(size=(3, 4)).astype(np.float32),
            "b": rng.normal(size=(4,)).astype(np.float32),
            "bn.num_batches_tracked": np.array(rng.integers(0, 100), dtype=np.int64),
        }
        for _ in range(n)
    ]


def test_fedavg_is_the_sample_weighted_mean():
    rng = np.random.default_rng(0)
    updates = random_updates(rng)
    counts = [10, 30, 5, 55]
    out = fedavg(zip(updates, counts))
    expected = sum(c * u["w"].astype(np.float64) for u, c in zip(updates, counts)) / sum(counts)
    np.testing.assert_allclose(out["w"], expected, rtol=1e-6)
    assert out["w"].dtype == np.float32


def test_integer_buffers_stay_integers():
    rng = np.random.default_rng(1)
    updates = random_updates(rng)
    out = fedavg(zip(updates, [1, 1, 1, 1]))
    assert out["bn.num_batches_tracked"].dtype == np.int64
    assert out["bn.num_batches_tracked"] == np.rint(np.mean([u["bn.num_batches_tracked"] for u in updates]))


def test_order_invariance_and_equal_counts_give_plain_mean():
    rng = np.random.default_rng(2)
    updates = random_updates(rng)
    a = fedavg(zip(updates, [3, 3, 3, 3]))
    b = fedavg(zip(updates[::-1], [3, 3, 3, 3]))
    np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6)
    np.testing.assert_allclose(
        a["w"], np.mean([u["w"] for u in updates], axis=0, dtype=np.float64), rtol=1e-6, atol=1e-7
    )


def test_bad_weights_raise():
    rng = np.random.default_rng(3)
    updates = random_updates(rng, 2)
    with pytest.raises(ValueError, match="sum to zero"):
        weighted_average(zip(updates, [0.0, 0.0]))
    with pytest.raises(ValueError, match=">= 0"):
        weighted_average(zip(updates, [1.0, -1.0]))
    with pytest.raises(ValueError, match="no updates"):
        weighted_average([])


def test_check_update_rejects_each_malformed_kind():
    rng = np.random.default_rng(4)
    good = random_updates(rng, 1)[0]
    spec = reference_spec(good)
    assert check_update(good, 10, spec) is None
    nan = {**good, "w": np.full((3, 4), np.nan, np.float32)}
    cases = {
        "shape": ({**good, "w": np.zeros((4, 3), np.float32)}, 10),
        "dtype": ({**good, "w": good["w"].astype(np.float64)}, 10),
        "non-finite": (nan, 10),
        "names": ({k: v for k, v in good.items() if k != "b"}, 10),
        "num-examples": (good, 0),
    }
    for expected, (arrays, n) in cases.items():
        reason = check_update(arrays, n, spec)
        assert reason is not None and expected in reason, (expected, reason)
    bn = {"bn.running_var": np.array([1.0, -0.5], np.float32)}
    assert "negative variances" in check_update(bn, 3, reference_spec(bn))
    assert "not a number" in check_update(good, "10", spec)
    assert "not a number" in check_update(good, True, spec)


def reference_weighted_average(updates):
    """The unblocked running float64 sum the blocked means replaced (the reference)."""
    updates = list(updates)
    total = sum(float(w) for _, w in updates)
    out = {}
    for key, first in updates[0][0].items():
        acc = np.zeros(np.shape(first), np.float64)
        for arrays, weight in updates:
            acc = acc + float(weight) * np.asarray(arrays[key], np.float64)
        acc = acc / total
        dtype = np.asarray(first).dtype
        out[key] = np.asarray(np.rint(acc).astype(dtype) if np.issubdtype(dtype, np.integer) else acc.astype(dtype))
    return out


def test_blocked_means_equal_the_running_float64_sum_bit_for_bit():
    rng = np.random.default_rng(11)
    big = BLOCK * 2 + 123  # several blocks and a ragged last one
    models = []
    for _ in range(5):
        models.append(
            {
                "big": rng.normal(size=big).astype(np.float32),
                "conv": rng.normal(size=(7, 3, 5)).astype(np.float32),
                "strided": rng.normal(size=(6, 8)).astype(np.float32)[:, ::2],  # not contiguous
                "half": rng.normal(size=9).astype(np.float16),
                "scalar": np.asarray(rng.normal(), np.float32),
                "counter": np.asarray(rng.integers(0, 1000), np.int64),
                "empty": np.zeros((0, 3), np.float32),
            }
        )
    weights = [float(w) for w in rng.uniform(0.1, 40, size=5)]
    got = weighted_average(zip(models, weights))
    want = reference_weighted_average(zip(models, weights))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert isinstance(got["scalar"], np.ndarray) and got["scalar"].ndim == 0

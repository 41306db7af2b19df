import numpy as np
import pytest

from strategies.aggregation import RunningMean, fedavg, weighted_average
from strategies.blocks import block_length, get_threads, set_threads
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


def mixed_models(rng, n=5):
    big = block_length(n) * 2 + 123  # several blocks and a ragged last one
    return [
        {
            "big": rng.normal(size=big).astype(np.float32),
            "conv": rng.normal(size=(7, 3, 5)).astype(np.float32),
            "strided": rng.normal(size=(6, 8)).astype(np.float32)[:, ::2],  # not contiguous
            "half": rng.normal(size=9).astype(np.float16),
            "scalar": np.asarray(rng.normal(), np.float32),
            "counter": np.asarray(rng.integers(0, 1000), np.int64),
            "empty": np.zeros((0, 3), np.float32),
        }
        for _ in range(n)
    ]


@pytest.fixture
def threads():
    """Set the aggregation thread count for one test, restored after it."""
    before = get_threads()
    yield set_threads
    set_threads(before)


@pytest.mark.parametrize("num_threads", [1, 3])
def test_blocked_means_equal_the_running_float64_sum(threads, num_threads):
    # The block's mean is one product with the normalized weights, not the running sum's order
    # of additions: equal to float64 rounding, hence to at most one ulp of the float32 output.
    threads(num_threads)
    rng = np.random.default_rng(11)
    models = mixed_models(rng)
    weights = [float(w) for w in rng.uniform(0.1, 40, size=5)]
    got = weighted_average(zip(models, weights))
    want = reference_weighted_average(zip(models, weights))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        if np.issubdtype(want[key].dtype, np.integer):
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        else:
            np.testing.assert_array_max_ulp(got[key], want[key], maxulp=1)
    assert isinstance(got["scalar"], np.ndarray) and got["scalar"].ndim == 0
    exact = weighted_average(({"big": m["big"].astype(np.float64)}, w) for m, w in zip(models, weights))
    reference = sum(w * m["big"].astype(np.float64) for m, w in zip(models, weights)) / sum(weights)
    np.testing.assert_allclose(exact["big"], reference, rtol=1e-12, atol=1e-15)


def test_thread_count_does_not_change_the_result(threads):
    rng = np.random.default_rng(12)
    models = mixed_models(rng, n=7)
    weights = [float(w) for w in rng.uniform(0.1, 40, size=7)]
    threads(1)
    one = weighted_average(zip(models, weights))
    threads(4)
    four = weighted_average(zip(models, weights))
    for key in one:
        np.testing.assert_array_equal(one[key], four[key], err_msg=key)


def test_thread_count_is_validated():
    with pytest.raises(ValueError, match=">= 0"):
        set_threads(-1)


@pytest.mark.parametrize("n", [1, 3, 17])
def test_running_mean_equals_the_blocked_mean(n):
    # Replies folded one at a time (float32 Kahan sums, two models of memory) against the float64
    # mean of all of them held at once: the same to float32 rounding; integers exactly.
    rng = np.random.default_rng(20 + n)
    models = mixed_models(rng, n)
    weights = [float(w) for w in rng.integers(1, 500, size=n)]
    running = RunningMean()
    for model, weight in zip(models, weights):
        running.add(model, weight)
    got, want = running.result(), weighted_average(zip(models, weights))
    assert running.count == n and running.total == sum(weights)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        if np.issubdtype(want[key].dtype, np.integer):
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        else:
            # Kahan's bound: a few units of rounding of the sum of magnitudes, not of the result
            # (which cancellation can make tiny), plus the final rounding to the output dtype.
            eps = np.finfo(want[key].dtype).eps
            magnitude = sum(w * np.abs(m[key].astype(np.float64)) for m, w in zip(models, weights)) / sum(weights)
            error = np.abs(got[key].astype(np.float64) - want[key].astype(np.float64))
            assert np.all(error <= 4 * eps * magnitude + np.spacing(np.abs(want[key]))), key


def test_running_mean_refuses_what_the_mean_refuses():
    rng = np.random.default_rng(3)
    a, b = random_updates(rng, 2)
    running = RunningMean()
    with pytest.raises(ValueError, match="no updates"):
        running.result()
    with pytest.raises(ValueError, match=">= 0"):
        running.add(a, -1.0)
    running.add(a, 0.0)
    with pytest.raises(ValueError, match="different tensor names"):
        running.add({k: v for k, v in b.items() if k != "b"}, 1.0)
    with pytest.raises(ValueError, match="sum to zero"):
        running.result()

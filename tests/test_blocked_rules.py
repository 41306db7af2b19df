"""The blocked, threaded aggregation rules against the straightforward implementations they
replaced (kept here as references): equal to float rounding, whatever the thread count."""

import numpy as np
import pytest

from strategies.blocks import WIDE_BLOCK_BYTES, block_length, get_threads, set_threads
from strategies.coordinatewise import coordinate_median, sorting_network, trimmed_mean
from strategies.fusion import geometric_median, is_parameter, krum, pairwise_sq_distances

# --- the references: whole-tensor numpy, as the rules were before they were blocked ------------


def cast_like(value, dtype):
    if np.issubdtype(dtype, np.integer):
        return np.asarray(np.rint(value).astype(dtype))
    return np.asarray(value.astype(dtype))


def reference_coordinatewise(models, rule):
    return {
        key: cast_like(np.asarray(rule(np.stack([np.asarray(m[key]) for m in models]))), np.asarray(first).dtype)
        for key, first in models[0].items()
    }


def reference_median(models):
    return reference_coordinatewise(models, lambda stacked: np.median(stacked, axis=0))


def reference_trimmed_mean(models, beta):
    def trim(stacked):
        n = stacked.shape[0]
        cut = int(beta * n)
        part = np.partition(stacked, (cut, n - cut - 1), axis=0)
        return np.mean(part[cut : n - cut], axis=0)

    return reference_coordinatewise(models, trim)


def flat64(models, key):
    return np.stack([np.asarray(m[key], dtype=np.float64).reshape(-1) for m in models])


def reference_distances(models):
    n = len(models)
    dist = np.zeros((n, n))
    for key, value in models[0].items():
        if is_parameter(key, value):
            flat = flat64(models, key)
            for i in range(n - 1):
                diff = flat[i + 1 :] - flat[i]
                dist[i, i + 1 :] += np.einsum("ij,ij->i", diff, diff)
    return dist + dist.T


def reference_mean64(models, weights):
    total = float(np.sum(weights))
    return {k: sum(float(w) * flat64(models, k)[i] for i, w in enumerate(weights)) / total for k in models[0]}


def reference_geometric_median(models, weights, eps=1e-6, max_iter=100, tol=1e-7):
    alphas = np.asarray(weights, np.float64) / np.sum(weights)
    keys = [k for k, v in models[0].items() if is_parameter(k, v)]

    def distances(center):
        return np.sqrt(
            sum(np.einsum("ij,ij->i", flat64(models, k) - center[k], flat64(models, k) - center[k]) for k in keys)
        )

    center = reference_mean64(models, alphas)
    dist = distances(center)
    objective = [float(alphas @ dist)]
    while len(objective) <= max_iter:
        center = reference_mean64(models, alphas / np.maximum(eps, dist))
        dist = distances(center)
        objective.append(float(alphas @ dist))
        if abs(objective[-2] - objective[-1]) <= tol * objective[-1]:
            break
    model = {k: cast_like(center[k].reshape(np.shape(models[0][k])), np.asarray(models[0][k]).dtype) for k in models[0]}
    return model, objective


# --- the cases ----------------------------------------------------------------------------------


def client_models(n, seed, spread=0.05):
    """Client models as a round's look: a shared base plus small per-client deltas, over tensors
    that span several blocks (and a ragged last one), small ones, a float64 one, BatchNorm
    statistics and an integer counter."""
    rng = np.random.default_rng(seed)
    big = block_length(n + 1, 4, WIDE_BLOCK_BYTES) * 3 + 17  # the longest blocks any rule takes
    base = {
        "conv.weight": rng.normal(size=(big,)).astype(np.float32),
        "fc.weight": rng.normal(size=(5, 7)).astype(np.float32),
        "fc.bias": rng.normal(size=(5,)).astype(np.float32),
        "head.double": rng.normal(size=(11,)),
        "bn.running_var": rng.uniform(0.5, 2.0, size=(6,)).astype(np.float32),
    }
    models = []
    for _ in range(n):
        model = {k: (v + spread * rng.normal(size=v.shape)).astype(v.dtype) for k, v in base.items()}
        model["bn.num_batches_tracked"] = np.asarray(rng.integers(0, 1000), np.int64)
        models.append(model)
    return models


@pytest.fixture(params=[1, 3], ids=["1-thread", "3-threads"])
def threads(request):
    before = get_threads()
    set_threads(request.param)
    yield request.param
    set_threads(before)


def assert_models_close(ours, theirs, rtol=0.0):
    """Bit-for-bit equal, or (``rtol``) equal relative to each tensor's scale; integers always exact."""
    assert list(ours) == list(theirs)
    for key, value in ours.items():
        want = theirs[key]
        assert value.dtype == want.dtype and value.shape == want.shape, key
        if np.issubdtype(value.dtype, np.integer) or rtol == 0:
            np.testing.assert_array_equal(value, want, err_msg=key)
        else:
            scale = float(np.max(np.abs(want), initial=1.0))
            np.testing.assert_allclose(value, want, rtol=rtol, atol=rtol * scale, err_msg=key)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10, 16, 33])
def test_median_equals_np_median_bit_for_bit(threads, n):
    models = client_models(n, seed=n)
    assert_models_close(coordinate_median(models), reference_median(models))


@pytest.mark.parametrize("n,beta", [(3, 0.2), (5, 0.2), (10, 0.2), (10, 0.1), (17, 0.3), (33, 0.45)])
def test_trimmed_mean_equals_the_partition_mean(threads, n, beta):
    # Ours sums the kept values in float64, the reference in float32: equal to float32 rounding.
    models = client_models(n, seed=100 + n)
    assert_models_close(trimmed_mean(models, beta), reference_trimmed_mean(models, beta), rtol=1e-6)


@pytest.mark.parametrize("n", [2, 3, 7, 12])
def test_distances_equal_the_float64_differences(threads, n):
    models = client_models(n, seed=200 + n)
    ours, want = pairwise_sq_distances(models), reference_distances(models)
    assert np.all(np.diag(ours) == 0) and np.array_equal(ours, ours.T)
    np.testing.assert_allclose(ours, want, rtol=5e-6)


def test_exact_copies_are_at_distance_zero_and_krum_picks_as_before(threads):
    models = client_models(9, seed=7)
    models[5] = {k: v.copy() for k, v in models[2].items()}  # colluders sending one model
    models[0]["conv.weight"] = models[0]["conv.weight"] + 4.0  # a clear outlier
    dist = pairwise_sq_distances(models)
    assert dist[2, 5] == 0.0 and dist[5, 2] == 0.0
    fused, selected = krum(models, num_malicious=2, num_selected=3)
    reference = reference_distances(models)
    scores = np.sort(reference[~np.eye(9, dtype=bool)].reshape(9, 8), axis=1)[:, :5].sum(axis=1)
    assert selected == [int(i) for i in np.argsort(scores, kind="stable")[:3]]
    assert 0 not in selected


@pytest.mark.parametrize("n", [3, 6, 11])
def test_geometric_median_equals_the_whole_tensor_weiszfeld(threads, n):
    models = client_models(n, seed=300 + n, spread=0.5)
    models[-1]["conv.weight"] = models[-1]["conv.weight"] * 30.0  # an outlier, so Weiszfeld iterates
    weights = np.random.default_rng(n).uniform(1, 50, size=n)
    ours, info = geometric_median(models, weights)
    theirs, objective = reference_geometric_median(models, weights)
    assert info["iterations"] == len(objective) - 1 >= 2
    np.testing.assert_allclose(info["objective"], objective, rtol=1e-12)
    # Same iterates to float64 rounding; relative to each tensor's scale, as values near 0 differ in ulps.
    assert_models_close(ours, theirs, rtol=1e-6)


def test_results_do_not_depend_on_the_thread_count():
    models = client_models(10, seed=5, spread=0.3)
    before = get_threads()
    try:
        runs = []
        for count in (1, 2, 5):
            set_threads(count)
            runs.append(
                (
                    coordinate_median(models),
                    trimmed_mean(models, 0.2),
                    pairwise_sq_distances(models),
                    geometric_median(models)[0],
                )
            )
    finally:
        set_threads(before)
    for other in runs[1:]:
        for ours, theirs in zip(runs[0], other):
            if isinstance(ours, dict):
                for key in ours:
                    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
            else:
                np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("n", range(1, 20))
def test_sorting_network_sorts_the_wanted_positions(n):
    rng = np.random.default_rng(n)
    everything = tuple(range(n))
    middle = (n // 2,) if n % 2 else (n // 2 - 1, n // 2)
    full, mid = sorting_network(n, everything), sorting_network(n, middle)
    assert len(mid) <= len(full)
    for _ in range(50):
        values = list(rng.integers(0, 4, size=n))  # many ties
        for network, wanted in ((full, everything), (mid, middle)):
            x = list(values)
            for i, j in network:
                if x[i] > x[j]:
                    x[i], x[j] = x[j], x[i]
            assert [x[p] for p in wanted] == [sorted(values)[p] for p in wanted]

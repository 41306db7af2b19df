import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.server.strategy.aggregate import (
    _compute_distances,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, MultiKrum
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import compute_distances, select_multikrum

from strategies.aggregation import average, fedavg
from strategies.coordinatewise import coordinate_median, trimmed_mean
from strategies.fusion import geometric_median, krum, krum_scores, pairwise_sq_distances
from strategies.records import numpy_to_arrays
from strategies.stage import fusion_rules
from tests.flower_messages import reply

PROJECT_DIR = Path(__file__).resolve().parent.parent
SEEDS = (0, 1, 2)
SIZES = (3, 5, 7, 10)
CASES = list(itertools.product(SEEDS, SIZES))


def random_models(rng, n, with_int=True, dtype=np.float32):
    models = []
    for _ in range(n):
        model = {
            "conv.weight": rng.normal(size=(4, 3, 3)).astype(dtype),
            "fc.bias": rng.normal(size=(5,)).astype(dtype),
            "temperature": np.asarray(rng.normal(), dtype=dtype),  # 0-d float
        }
        if with_int:
            model["bn.num_batches_tracked"] = np.asarray(rng.integers(0, 100), dtype=np.int64)
        models.append(model)
    return models


def replies(models, counts=None):
    counts = counts or [1] * len(models)
    return [reply(i + 1, m, {"num-examples": c}) for i, (m, c) in enumerate(zip(models, counts))]


def flower_train(strategy, models, counts=None):
    record, _ = strategy.aggregate_train(1, replies(models, counts))
    return {key: array.numpy() for key, array in record.items()}


def as_ndarrays(models):
    return [(list(m.values()), 1) for m in models]


def assert_same_model(ours, theirs, float_sum=False):
    """Bit-for-bit equal; integer tensors in ours are Flower's float result rounded back.

    ``float_sum``: ours sums in float64 where Flower sums float32 values in float32, so equal
    only to Flower's float32 rounding (a few ulps of the largest term)."""
    assert list(ours) == list(theirs)
    for key, value in ours.items():
        assert isinstance(value, np.ndarray), key
        assert value.shape == np.shape(theirs[key]), key
        if np.issubdtype(value.dtype, np.integer):
            np.testing.assert_array_equal(value, np.rint(theirs[key]).astype(value.dtype), err_msg=key)
        else:
            assert value.dtype == np.asarray(theirs[key]).dtype, key
            if float_sum:
                scale = float(np.max(np.abs(theirs[key]), initial=1.0))
                np.testing.assert_allclose(value, theirs[key], rtol=1e-6, atol=1e-6 * scale, err_msg=key)
            else:
                np.testing.assert_array_equal(value, theirs[key], err_msg=key)


def flat(model):
    floats = [v for v in model.values() if np.issubdtype(v.dtype, np.floating)]
    return np.concatenate([np.ravel(v).astype(np.float64) for v in floats])


# --- equality with Flower ---------------------------------------------------------------------


@pytest.mark.parametrize("seed,n", CASES)
def test_median_equals_flower_fedmedian(seed, n):
    models = random_models(np.random.default_rng(seed), n)
    ours = coordinate_median(models)
    assert_same_model(ours, flower_train(FedMedian(), models))
    legacy = aggregate_median(as_ndarrays(models))
    assert_same_model(ours, dict(zip(models[0], legacy)))


@pytest.mark.parametrize("seed,n", CASES)
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.2, 0.3, 0.45])
def test_trimmed_mean_equals_flower_fedtrimmedavg(seed, n, beta):
    models = random_models(np.random.default_rng(seed), n)
    ours = trimmed_mean(models, beta)
    assert_same_model(ours, flower_train(FedTrimmedAvg(beta=beta), models), float_sum=True)
    legacy = aggregate_trimmed_avg(as_ndarrays(models), beta)
    assert_same_model(ours, dict(zip(models[0], legacy)), float_sum=True)


def test_trimmed_mean_cut_is_int_of_beta_times_n():
    # 0.29 * 100 == 28.999999999999996, so Flower (and scipy) cut 28 per side, not 29.
    values = np.random.default_rng(0).permutation(np.arange(100.0) ** 2)
    models = [{"s": np.asarray(v)} for v in values]
    ours = trimmed_mean(models, 0.29)["s"]
    assert ours == trim_mean(values, 0.29)
    assert ours == np.mean(np.sort(values)[28:72])
    assert ours != np.mean(np.sort(values)[29:71])
    # Too few clients for beta: nothing is cut, the result is the plain mean.
    three = [{"s": np.asarray(v)} for v in (1.0, 2.0, 30.0)]
    assert trimmed_mean(three, 0.3)["s"] == 11.0


@pytest.mark.parametrize("seed,n", CASES)
def test_krum_selects_what_flower_krum_selects(seed, n):
    rng = np.random.default_rng(seed)
    # Flower's Krum distances include integer tensors; ours leave them out, so compare on floats.
    models = random_models(rng, n, with_int=False)
    models[rng.integers(n)]["fc.bias"] += 3.0  # one clear outlier, as Krum is meant for
    for f in range((n - 3) // 2 + 1):
        ours, selected = krum(models, num_malicious=f)
        theirs = flower_train(Krum(num_malicious_nodes=f), models)
        assert_same_model(ours, theirs)
        matches = [i for i, m in enumerate(models) if all(np.array_equal(m[k], theirs[k]) for k in m)]
        assert selected == matches
        legacy = aggregate_krum(as_ndarrays(models), num_malicious=f, to_keep=0)
        assert_same_model(ours, dict(zip(models[0], legacy)))


@pytest.mark.parametrize("seed,n", CASES)
def test_multikrum_selects_and_averages_like_flower(seed, n):
    rng = np.random.default_rng(seed)
    models = random_models(rng, n, with_int=False)
    counts = [int(c) for c in rng.integers(1, 50, size=n)]
    for f, m in itertools.product(range((n - 3) // 2 + 1), range(1, n + 1)):
        ours, selected = krum(models, num_malicious=f, num_selected=m, weights=counts)
        contents = [msg.content for msg in replies(models, counts)]
        chosen = select_multikrum(contents, num_malicious_nodes=f, num_nodes_to_select=m)
        assert selected == [next(i for i, c in enumerate(contents) if c is rd) for rd in chosen]
        theirs = flower_train(MultiKrum(num_malicious_nodes=f, num_nodes_to_select=m), models, counts)
        legacy = dict(zip(models[0], aggregate_krum([(list(models[i].values()), counts[i]) for i in range(n)], f, m)))
        # Flower sums Σ xᵢ·(wᵢ/W) in float32, we in float64: equal up to float32 rounding.
        for key in ours:
            np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(ours[key], legacy[key], rtol=1e-6, atol=1e-6)
            assert ours[key].dtype == np.float32


@pytest.mark.parametrize("seed,n", CASES)
def test_distances_match_flowers(seed, n):
    models = random_models(np.random.default_rng(seed), n, with_int=False, dtype=np.float64)
    ours = pairwise_sq_distances(models)
    brute = np.array([[np.sum((flat(a) - flat(b)) ** 2) for b in models] for a in models])
    np.testing.assert_allclose(ours, brute, rtol=1e-13)
    assert np.all(np.diag(ours) == 0) and np.array_equal(ours, ours.T)
    np.testing.assert_allclose(ours, _compute_distances([list(m.values()) for m in models]), rtol=1e-12, atol=1e-12)
    # Flower's ‖x‖²+‖y‖²−2x·y leaves rounding noise on the diagonal: hence the atol.
    records = [numpy_to_arrays(m) for m in models]
    np.testing.assert_allclose(ours, compute_distances(records), rtol=1e-10, atol=1e-10)


# --- our own properties -------------------------------------------------------------------------


def test_integer_buffers_do_not_count_in_distances():
    rng = np.random.default_rng(5)
    a = random_models(rng, 1)[0]
    b = {**a, "bn.num_batches_tracked": a["bn.num_batches_tracked"] + 1000}
    d = pairwise_sq_distances([a, b])
    assert np.all(d == 0)


def test_krum_scores_hand_example_and_tie_break():
    points = [0.0, 1.0, 2.0, 3.0, 100.0]
    models = [{"x": np.asarray(p)} for p in points]
    d = pairwise_sq_distances(models)
    np.testing.assert_array_equal(d, (np.subtract.outer(points, points)) ** 2)
    # f=1: each score sums the n-f-2 = 2 nearest others.
    np.testing.assert_array_equal(krum_scores(d, 1), [5.0, 2.0, 2.0, 5.0, 97.0**2 + 98.0**2])
    _, selected = krum(models, 1)
    assert selected == [1]  # 1 and 2 tie: the lower index wins
    _, selected = krum(models, 1, num_selected=4)
    assert selected == [1, 2, 0, 3]


def test_krum_requirements_raise():
    models = random_models(np.random.default_rng(0), 4)
    with pytest.raises(ValueError, match=r"more than 2f \+ 2 = 4 clients .* f = 1 .* got 4"):
        krum(models, num_malicious=1)
    with pytest.raises(ValueError, match="num_malicious"):
        krum(models, num_malicious=-1)
    for m in (0, 5):
        with pytest.raises(ValueError, match="num_selected"):
            krum(models, num_malicious=0, num_selected=m)
    with pytest.raises(ValueError, match="2 weights for 4 models"):
        krum(models, num_malicious=0, weights=[1, 2])


def test_trimmed_mean_beta_range():
    models = random_models(np.random.default_rng(0), 5)
    for beta in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
            trimmed_mean(models, beta)


def test_empty_and_mismatched_models_raise():
    models = random_models(np.random.default_rng(0), 3)
    for fuse in (coordinate_median, lambda m: trimmed_mean(m, 0.1), geometric_median, pairwise_sq_distances):
        with pytest.raises(ValueError, match="no models"):
            fuse([])
        with pytest.raises(ValueError, match="model 2 has different tensor names"):
            fuse([*models[:2], {"w": np.zeros(3)}])


def test_average_equals_fedavg_with_equal_counts():
    models = random_models(np.random.default_rng(3), 6)
    ours = average(models)
    # Power-of-two counts scale exactly, so the two must agree to the bit.
    assert_same_model(ours, fedavg((m, 4) for m in models))
    expected = np.mean([m["conv.weight"] for m in models], axis=0, dtype=np.float64)
    np.testing.assert_allclose(ours["conv.weight"], expected, rtol=1e-6)
    assert isinstance(ours["temperature"], np.ndarray) and ours["temperature"].shape == ()


ALL_RULES = {
    "average": lambda m: average(m),
    "median": coordinate_median,
    "trimmed-mean": lambda m: trimmed_mean(m, 0.2),
    "geometric-median": lambda m: geometric_median(m)[0],
    "krum": lambda m: krum(m, 1)[0],
    "multi-krum": lambda m: krum(m, 1, num_selected=3)[0],
}


@pytest.mark.parametrize("name", ALL_RULES)
def test_order_invariance_and_dtypes(name):
    rng = np.random.default_rng(11)
    models = random_models(rng, 7)
    fuse = ALL_RULES[name]
    base = fuse(models)
    for _ in range(3):
        perm = rng.permutation(len(models))
        other = fuse([models[i] for i in perm])
        for key, value in base.items():
            assert value.dtype == models[0][key].dtype and value.shape == models[0][key].shape, key
            if name in ("median", "krum", "multi-krum"):
                np.testing.assert_array_equal(other[key], value, err_msg=key)
            else:
                np.testing.assert_allclose(other[key], value, rtol=1e-6, atol=1e-6, err_msg=key)


def test_krum_selection_is_permutation_equivariant():
    rng = np.random.default_rng(12)
    models = random_models(rng, 9)
    _, selected = krum(models, 2, num_selected=4)
    perm = rng.permutation(9)
    _, permuted = krum([models[i] for i in perm], 2, num_selected=4)
    assert [int(perm[i]) for i in permuted] == selected


def test_robust_rules_resist_one_huge_outlier():
    rng = np.random.default_rng(7)
    center = random_models(rng, 1)[0]

    def perturb(change):
        return {k: change(v).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in center.items()}

    honest = [perturb(lambda v: v + 0.01 * rng.normal(size=v.shape)) for _ in range(5)]
    outlier = perturb(lambda v: v * 1e6)
    models = honest[:2] + [outlier] + honest[2:]
    honest_mean = flat(average(honest))
    # Honest models sit about 0.01 * sqrt(42) ≈ 0.065 from their mean.
    spread = max(np.linalg.norm(flat(m) - honest_mean) for m in honest)
    assert np.linalg.norm(flat(average(models)) - honest_mean) > 1e4
    robust = {
        "median": coordinate_median(models),
        "trimmed-mean": trimmed_mean(models, 0.2),
        "geometric-median": geometric_median(models)[0],
        "krum": krum(models, 1)[0],
    }
    for name, fused in robust.items():
        assert np.linalg.norm(flat(fused) - honest_mean) <= 1.5 * spread, name
    assert 2 not in krum(models, 1, num_selected=4)[1]


# --- geometric median ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed,n", CASES)
def test_geometric_median_converges_with_non_increasing_objective(seed, n):
    rng = np.random.default_rng(seed)
    models = random_models(rng, n)
    weights = rng.uniform(0.5, 2.0, size=n)
    model, info = geometric_median(models, weights=weights)
    objective = np.array(info["objective"])
    assert info["converged"] and 1 <= info["iterations"] < 100
    assert len(objective) == info["iterations"] + 1
    assert np.all(np.diff(objective) <= 0), np.diff(objective)
    # The objective recomputed from the returned model matches the last value, and is no worse
    # than at the weighted mean or at any client.
    points = np.stack([flat(m) for m in models])
    alphas = weights / weights.sum()

    def cost(v):
        return float(alphas @ np.linalg.norm(points - v, axis=1))

    mean = alphas @ points
    assert cost(flat(model)) == pytest.approx(objective[-1], rel=1e-5)
    assert objective[0] == pytest.approx(cost(mean), rel=1e-12)
    assert objective[-1] <= min(cost(mean), *(cost(p) for p in points))
    # First-order optimality: the weighted sum of unit vectors towards the clients is ~0.
    v = np.stack([flat({k: np.asarray(x) for k, x in model.items()})])[0]
    units = (points - v) / np.linalg.norm(points - v, axis=1, keepdims=True)
    assert np.linalg.norm(alphas @ units) < 1e-3


def test_geometric_median_of_scalars_is_the_median():
    rng = np.random.default_rng(4)
    for n in (3, 5, 7):
        values = rng.normal(size=n)
        model, info = geometric_median([{"s": np.asarray(v)} for v in values])
        assert info["converged"]
        assert model["s"] == pytest.approx(np.median(values), abs=1e-6)
    # Weighted: with 0.6 of the weight, client 3 is the weighted median.
    values = [0.0, 1.0, 2.0, 10.0, 11.0]
    model, _ = geometric_median([{"s": np.asarray(v)} for v in values], weights=[1, 1, 1, 6, 1])
    assert model["s"] == pytest.approx(10.0, abs=1e-6)


def test_geometric_median_weights_matter():
    rng = np.random.default_rng(9)
    models = random_models(rng, 5)
    plain, _ = geometric_median(models)
    heavy, _ = geometric_median(models, weights=[6, 1, 1, 1, 1])
    # A client holding more than half the weight is the weighted geometric median itself.
    np.testing.assert_allclose(flat(heavy), flat(models[0]), atol=1e-5)
    assert np.linalg.norm(flat(plain) - flat(models[0])) > 0.5
    assert heavy["bn.num_batches_tracked"].dtype == np.int64


def test_geometric_median_of_identical_models_and_iteration_cap():
    model = random_models(np.random.default_rng(2), 1)[0]
    out, info = geometric_median([model] * 4)
    assert_same_model(out, model)
    assert info["converged"] and info["objective"][-1] == 0.0
    _, info = geometric_median(random_models(np.random.default_rng(3), 6), max_iter=2, tol=0.0)
    assert info["iterations"] == 2 and not info["converged"] and len(info["objective"]) == 3
    with pytest.raises(ValueError, match="negative"):
        geometric_median([model, model], weights=[1, -1])


def test_fusion_names_and_no_flower_import():
    # The registry's built-in fusion-fn names (in name order), all and only these.
    assert fusion_rules() == (
        "bulyan",
        "centered-clipping",
        "feddf",
        "fltrust",
        "geometric-median",
        "krum",
        "median",
        "trimmed-mean",
    )
    # The math must stay importable without Flower (tests import it, so check in a fresh process).
    code = (
        "import sys, strategies.coordinatewise, strategies.fusion, strategies.defences, strategies.weighting; "
        "print(any(m.startswith('flwr') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_DIR, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(("seed", "n"), [(s, n) for s, n in CASES if n >= 5])
def test_fusion_strategy_multikrum_weights_like_flowers_multikrum(seed, n):
    """Multi-Krum through the strategy averages the selected models by sample count, as Flower's
    MultiKrum does (on float tensors, where both measure the same distances)."""
    from flwr.serverapp.strategy import MultiKrum

    from strategies.aggregators.krum import Krum as KrumRule  # ours; Flower's Krum is imported above
    from strategies.strategy import VideoStrategy
    from strategies.validation import reference_spec

    rng = np.random.default_rng(seed)
    models = random_models(rng, n, with_int=False)
    counts = [int(c) for c in rng.integers(1, 50, size=n)]
    f, m = 1, n - 3
    ours = VideoStrategy(KrumRule(malicious=f, selected=m), min_train_nodes=1)
    ours.screener.reference = reference_spec(models[0])  # replies checked against the layout only
    report = ours.train_round(1, replies(models, counts))
    theirs = flower_train(MultiKrum(num_malicious_nodes=f, num_nodes_to_select=m), models, counts)
    for key in theirs:
        np.testing.assert_allclose(report.arrays[key], theirs[key], rtol=1e-5, atol=1e-6)


def batchnorm_models(rng):
    """4 honest clients with close weights but widely spread BatchNorm statistics (as measured), and
    one attacker who moves the weights far and leaves its statistics at the honest mean."""
    honest = [
        {
            "conv.weight": rng.normal(0.0, 0.01, size=(4, 3)).astype(np.float32),
            "bn.running_mean": np.full(50, 10.0 * i, np.float32),
            "bn.running_var": np.full(50, 1.0 + 20.0 * i, np.float32),
            "bn.num_batches_tracked": np.asarray(100 * i, np.int64),
        }
        for i in range(4)
    ]
    mean = {k: np.mean([m[k] for m in honest], axis=0).astype(honest[0][k].dtype) for k in honest[0]}
    attacker = {**mean, "conv.weight": np.full((4, 3), 5.0, np.float32)}
    return honest, attacker


def test_distances_are_over_learnable_parameters_not_batchnorm_statistics():
    honest, attacker = batchnorm_models(np.random.default_rng(0))
    models = [*honest, attacker]
    # Over every float tensor the attacker would be the most central model; over the weights, the farthest.
    dist = pairwise_sq_distances(models)
    assert np.argmax(dist.sum(axis=1)) == 4
    _, selected = krum(models, num_malicious=1)
    assert selected[0] != 4
    fused, _ = geometric_median(models)
    assert np.abs(fused["conv.weight"]).max() < 0.5  # the attacker's 5.0 barely moves it


def test_krum_takes_the_statistics_of_the_clients_it_selects():
    honest, attacker = batchnorm_models(np.random.default_rng(1))
    models = [*honest, attacker]
    fused, (chosen,) = krum(models, num_malicious=1)
    for key in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        np.testing.assert_array_equal(fused[key], models[chosen][key])

"""Defences (strategies/defences.py) against reference formulas written here, Flower's Bulyan, and
through the strategy (VideoStrategy.train_round on Flower replies, with the defence's stage)."""

import itertools
import math
import re

import numpy as np
import pytest
from flwr.serverapp.strategy import Bulyan

from fedapp.task.config import ConfigError, parse_config
from strategies.aggregators.bulyan import Bulyan as BulyanRule  # ours; Flower's Bulyan is imported above
from strategies.aggregators.centered_clipping import CenteredClipping
from strategies.aggregators.krum import Krum
from strategies.aggregators.median import Median
from strategies.coordinatewise import coordinate_median
from strategies.defences import (
    bound_update_norm,
    bucket_assignment,
    bucket_means,
    bulyan,
    bulyan_select,
    bulyan_tolerance,
    centered_clipping,
    nearest_neighbor_mixing,
)
from strategies.stage import fusion_rules
from strategies.strategy import VideoStrategy
from strategies.transforms.bucketing import Bucketing
from strategies.transforms.nnm import NearestNeighbourMixing
from strategies.transforms.norm_bound import NormBound
from tests.flower_messages import reply

SEEDS = (0, 1, 2)


def random_models(rng, n, with_bn=False, scale=1.0):
    models = []
    for _ in range(n):
        model = {
            "conv.weight": (scale * rng.normal(size=(4, 3, 3))).astype(np.float32),
            "fc.bias": (scale * rng.normal(size=(5,))).astype(np.float32),
        }
        if with_bn:
            model["bn.running_mean"] = rng.normal(size=(3,)).astype(np.float32)
            model["bn.running_var"] = rng.uniform(0.5, 2.0, size=(3,)).astype(np.float32)
            model["bn.num_batches_tracked"] = np.asarray(rng.integers(0, 100), dtype=np.int64)
        models.append(model)
    return models


PARAMS = ("conv.weight", "fc.bias")


def vec(model, keys=PARAMS):
    return np.concatenate([np.ravel(model[k]).astype(np.float64) for k in keys])


def unvec(v, like, keys=PARAMS):
    out, start = {}, 0
    for k in keys:
        size = np.size(like[k])
        out[k] = v[start : start + size].reshape(np.shape(like[k]))
        start += size
    return out


def replies(models, counts=None):
    counts = counts or [1] * len(models)
    return [reply(i + 1, m, {"num-examples": c}) for i, (m, c) in enumerate(zip(models, counts))]


def prepared(strategy, global_model):
    """A strategy as configure_train leaves it: the round's global model set."""
    strategy.set_global(global_model)
    return strategy


def moved(model):
    """A global model of the same layout that no reply equals (a reply equal to the global model is
    rejected as a free rider before any rule sees it)."""
    return {k: v + np.asarray(0.5, v.dtype) if v.dtype.kind == "f" else v for k, v in model.items()}


def test_new_rules_are_fusion_functions():
    assert {"centered-clipping", "bulyan"} <= set(fusion_rules())


# --- bucketing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "s"), list(itertools.product((1, 5, 7, 10), (1, 2, 3, 4))))
def test_buckets_are_a_seeded_permutation_in_ceil_n_over_s_groups(n, s):
    buckets = bucket_assignment(n, s, seed=[3, 1])
    assert len(buckets) == math.ceil(n / s)
    assert sorted(i for b in buckets for i in b) == list(range(n))
    assert all(len(b) == s for b in buckets[:-1]) and 1 <= len(buckets[-1]) <= s
    assert buckets == bucket_assignment(n, s, seed=[3, 1])  # reproducible


def test_buckets_change_with_the_round():
    assert bucket_assignment(20, 2, [0, 1]) != bucket_assignment(20, 2, [0, 2])


@pytest.mark.parametrize(("seed", "n", "s"), list(itertools.product(SEEDS, (5, 8), (2, 3))))
def test_bucket_means_are_weighted_means_with_summed_weights(seed, n, s):
    rng = np.random.default_rng(seed)
    models = random_models(rng, n, with_bn=True)
    counts = [float(c) for c in rng.integers(1, 30, size=n)]
    means, weights, buckets = bucket_means(models, s, seed, counts)
    assert buckets == bucket_assignment(n, s, seed)
    for mean, weight, bucket in zip(means, weights, buckets):
        assert weight == sum(counts[i] for i in bucket)
        for key in models[0]:
            ref = sum(counts[i] * models[i][key].astype(np.float64) for i in bucket) / weight
            assert mean[key].dtype == models[0][key].dtype
            if key.endswith("num_batches_tracked"):
                assert mean[key] == np.rint(ref)
            else:
                np.testing.assert_allclose(mean[key], ref, rtol=1e-6, atol=1e-6)


def test_bucketing_then_median_through_the_strategy_equals_the_composition():
    rng = np.random.default_rng(4)
    models = random_models(rng, 9)
    counts = [int(c) for c in rng.integers(1, 20, size=9)]
    strategy = VideoStrategy(Median(), transforms=[Bucketing(2, seed=7)], min_train_nodes=1)
    report = prepared(strategy, moved(models[0])).train_round(3, replies(models, counts))
    buckets = bucket_assignment(9, 2, [7, 3])
    means = [
        {k: sum(counts[i] * models[i][k].astype(np.float64) for i in b) / sum(counts[i] for i in b) for k in PARAMS}
        for b in buckets
    ]
    for key in PARAMS:
        np.testing.assert_allclose(report.arrays[key], np.median(np.stack([m[key] for m in means]), axis=0), rtol=1e-6)
    assert report.fusion["buckets"] == [[i + 1 for i in b] for b in buckets]  # node ids are index + 1


def test_bucketing_helps_median_against_heterogeneous_honest_clients():
    # Two honest groups (non-iid) at −1 and +1, uneven: the plain median picks a group's value;
    # bucket means of pairs pull it towards the honest mean (0.2) — the paper's motivation.
    honest = [{"w": np.full(3, v, np.float32)} for v in [-1.0] * 4 + [1.0] * 6]
    plain = coordinate_median(honest)["w"][0]
    strategy = VideoStrategy(Median(), transforms=[Bucketing(5, seed=0)], min_train_nodes=1)
    fused = [prepared(strategy, moved(honest[0])).train_round(r, replies(honest)).arrays["w"][0] for r in range(1, 30)]
    assert abs(plain - 0.2) == pytest.approx(0.8)
    assert abs(np.mean(fused) - 0.2) < 0.3


def test_krum_on_buckets_maps_f_to_the_bucket_count():
    rng = np.random.default_rng(5)
    models = random_models(rng, 10)
    strategy = VideoStrategy(Krum(3), transforms=[Bucketing(2, seed=0)], min_train_nodes=1)
    report = prepared(strategy, moved(models[0])).train_round(1, replies(models))
    # 5 buckets allow f = (5 − 3) // 2 = 1, not 3; the selected bucket's two nodes are named.
    assert report.fusion["krum-malicious"] == 1
    assert len(report.fusion["selected-nodes"]) == 2
    assert report.fusion["selected-nodes"] in report.fusion["buckets"]


# --- centered clipping ---------------------------------------------------------------------------


def reference_cc(xs, v, tau, iterations):
    v = v.copy()
    for _ in range(iterations):
        step = np.zeros_like(v)
        for x in xs:
            z = x - v
            norm = np.linalg.norm(z)
            step += z * min(1.0, tau / norm) if norm > 0 else z
        v = v + step / len(xs)
    return v


def test_centered_clipping_hand_example():
    models = [{"w": np.asarray([v], np.float64)} for v in (1.0, 2.0, 100.0)]
    fused, info = centered_clipping(models, {"w": np.zeros(1)}, radius=3.0)
    assert fused["w"][0] == pytest.approx((1 + 2 + 3) / 3)  # 100 is clipped to 3
    assert info["clipped"] == [1] and info["update-norms"] == [1.0, 2.0, 100.0]


@pytest.mark.parametrize(("seed", "n", "iterations"), list(itertools.product(SEEDS, (3, 6), (1, 3))))
def test_centered_clipping_equals_reference(seed, n, iterations):
    rng = np.random.default_rng(seed)
    models = random_models(rng, n)
    center = random_models(rng, 1, scale=0.1)[0]
    norms = [np.linalg.norm(vec(m) - vec(center)) for m in models]
    tau = float(np.median(norms))  # some clipped, some not
    fused, info = centered_clipping(models, center, tau, iterations)
    ref = reference_cc([vec(m) for m in models], vec(center), tau, iterations)
    np.testing.assert_allclose(vec(fused), ref, rtol=1e-5, atol=1e-6)
    assert len(info["clipped"]) == iterations and info["clipped"][0] == sum(x > tau for x in norms)


def test_centered_clipping_bounds_a_byzantine_client():
    rng = np.random.default_rng(0)
    center = {k: np.zeros_like(v) for k, v in random_models(rng, 1)[0].items()}
    honest = random_models(rng, 6, scale=0.01)
    attacker = {k: np.full_like(v, 1e6) for k, v in honest[0].items()}
    fused, _ = centered_clipping([*honest, attacker], center, radius=0.5)
    honest_mean = np.mean([vec(m) for m in honest], axis=0)
    # One client moves v by at most τ/N, however far it is.
    assert np.linalg.norm(vec(fused) - honest_mean * 6 / 7) <= 0.5 / 7 + 1e-6


def test_centered_clipping_moves_statistics_by_the_clients_factor():
    models = [
        {"w": np.asarray([4.0], np.float32), "bn.running_mean": np.asarray([8.0], np.float32)},
        {"w": np.asarray([1.0], np.float32), "bn.running_mean": np.asarray([2.0], np.float32)},
    ]
    center = {"w": np.zeros(1, np.float32), "bn.running_mean": np.zeros(1, np.float32)}
    fused, _ = centered_clipping(models, center, radius=2.0)
    # factors 2/4 and 1 (norms over "w" only): w = (2 + 1)/2, statistics (4 + 2)/2
    assert fused["w"][0] == pytest.approx(1.5) and fused["bn.running_mean"][0] == pytest.approx(3.0)


def test_centered_clipping_argument_checks():
    models = [{"w": np.ones(2)}]
    with pytest.raises(ValueError, match="radius"):
        centered_clipping(models, {"w": np.zeros(2)}, 0.0)
    with pytest.raises(ValueError, match="iteration"):
        centered_clipping(models, {"w": np.zeros(2)}, 1.0, iterations=0)
    with pytest.raises(ValueError, match="center"):
        centered_clipping(models, {}, 1.0)


def test_centered_clipping_through_the_strategy_starts_from_the_global_model():
    rng = np.random.default_rng(2)
    global_model = random_models(rng, 1)[0]
    models = [{k: v + 0.01 * rng.normal(size=v.shape).astype(np.float32) for k, v in global_model.items()}
              for _ in range(4)]  # fmt: skip
    models.append({k: v + 1000.0 for k, v in global_model.items()})
    strategy = VideoStrategy(CenteredClipping(radius=0.1, iterations=2), min_train_nodes=1)
    report = prepared(strategy, global_model).train_round(1, replies(models))
    ref = reference_cc([vec(m) for m in models], vec(global_model), 0.1, 2)
    np.testing.assert_allclose(vec(report.arrays), ref, rtol=1e-5, atol=1e-5)
    assert np.abs(vec(report.arrays) - vec(global_model)).max() < 0.1
    assert report.fusion["clipped"][0] >= 1 and report.fusion["update-norm-median"] > 0


# --- Bulyan --------------------------------------------------------------------------------------


def reference_bulyan(models, f):
    xs = [vec(m) for m in models]
    n = len(xs)
    d = np.array([[np.sum((a - b) ** 2) for b in xs] for a in xs])
    remaining, chosen = list(range(n)), []
    while len(chosen) < n - 2 * f:
        scores = []
        for i in remaining:
            others = sorted(d[i, j] for j in remaining if j != i)
            scores.append(sum(others[: max(1, len(remaining) - f - 2)]))
        best = remaining[int(np.argmin(scores))]
        chosen.append(best)
        remaining.remove(best)
    beta = len(chosen) - 2 * f
    stacked = np.stack([xs[i] for i in chosen])
    out = np.empty(stacked.shape[1])
    for c in range(stacked.shape[1]):
        column = stacked[:, c]
        med = np.median(column)
        closest = sorted(column, key=lambda x: abs(x - med))[:beta]
        out[c] = np.mean(closest)
    return out, chosen


@pytest.mark.parametrize(("seed", "n", "f"), [(s, n, f) for s in SEEDS for n, f in ((3, 0), (7, 1), (9, 1), (11, 2))])
def test_bulyan_equals_reference(seed, n, f):
    models = random_models(np.random.default_rng(seed), n)
    fused, selected = bulyan(models, f)
    ref, chosen = reference_bulyan(models, f)
    assert selected == chosen
    np.testing.assert_allclose(vec(fused), ref, rtol=1e-5, atol=1e-6)


def test_bulyan_hand_example():
    # 7 scalars, f=1: repeated Krum keeps θ=5 of them, then the mean of the β=3 closest to their median.
    values = [0.0, 1.0, 2.0, 3.0, 4.0, 50.0, -60.0]
    models = [{"w": np.asarray([v])} for v in values]
    fused, selected = bulyan(models, 1)
    assert sorted(values[i] for i in selected) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert fused["w"][0] == pytest.approx(2.0)  # median 2, closest 1, 2, 3


def flower_bulyan(models, f, selection_rule=None):
    strategy = Bulyan(num_malicious_nodes=f, selection_rule=selection_rule)
    record, _ = strategy.aggregate_train(1, replies(models))
    return {key: array.numpy() for key, array in record.items()}


@pytest.mark.parametrize(("seed", "n", "f"), [(s, n, f) for s in SEEDS for n, f in ((7, 1), (10, 1), (11, 2))])
def test_bulyan_equals_flowers(seed, n, f):
    models = random_models(np.random.default_rng(seed), n)
    # Flower's default selection: the θ best scores of one multi-Krum pass.
    ours, _ = bulyan(models, f, repeated=False)
    theirs = flower_bulyan(models, f)
    # The paper's repeated Krum (checked against the reference above), handed to Flower's Bulyan as
    # its selection rule, so that its coordinate step runs on our selection. Flower's own Krum,
    # repeated, would differ by design in ties: near the end the sets are small and Krum counts one
    # neighbour, so the closest pair always ties; we take the lower index, Flower's float32
    # ‖x‖²+‖y‖²−2x·y takes whichever rounding favours.
    ours_repeated, selected = bulyan(models, f)
    theirs_repeated = flower_bulyan(models, f, lambda contents, _f, _k: [contents[i] for i in selected])
    for key in PARAMS:
        np.testing.assert_array_equal(ours[key], theirs[key])
        np.testing.assert_array_equal(ours_repeated[key], theirs_repeated[key])


def test_bulyan_neutralises_byzantine_outliers():
    rng = np.random.default_rng(3)
    honest = random_models(rng, 9, scale=0.01)
    attackers = [{k: np.full_like(v, 100.0) for k, v in honest[0].items()} for _ in range(2)]
    fused, selected = bulyan([*honest, *attackers], 2)
    # The first Krum picks (many neighbours counted) are honest; the last ones count a single
    # neighbour, and the colluding pair, each other's nearest at distance 0, may get in there;
    # the coordinate step (β closest to the median) still trims them away.
    assert not {9, 10} & set(selected[:3])
    assert np.abs(vec(fused)).max() < 0.05


def test_bulyan_requirements_and_tolerance():
    models = random_models(np.random.default_rng(0), 6)
    with pytest.raises(ValueError, match="4f"):
        bulyan_select(models, 1)
    assert bulyan_tolerance(6, 1) == 0 and bulyan_tolerance(7, 1) == 1 and bulyan_tolerance(11, 5) == 2
    with pytest.raises(ValueError):
        bulyan_tolerance(2, 0)


def test_bulyan_through_the_strategy_names_the_selected_nodes():
    rng = np.random.default_rng(6)
    models = random_models(rng, 6, with_bn=True)  # 6 < 4·1+3: runs with f = 0
    strategy = VideoStrategy(BulyanRule(1), min_train_nodes=1)
    report = prepared(strategy, moved(models[0])).train_round(1, replies(models))
    assert report.fusion["bulyan-malicious"] == 0 and sorted(report.fusion["selected-nodes"]) == list(range(1, 7))
    np.testing.assert_allclose(report.arrays["fc.bias"], np.mean([m["fc.bias"] for m in models], axis=0), rtol=1e-5)
    assert report.arrays["bn.num_batches_tracked"].dtype == np.int64


# --- norm bounding -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_norm_bound_equals_reference(seed):
    rng = np.random.default_rng(seed)
    model, center = random_models(rng, 2, with_bn=True)
    norm = np.linalg.norm(vec(model) - vec(center))
    bounded, measured = bound_update_norm(model, center, norm / 3)
    assert measured == pytest.approx(norm)
    ref = vec(center) + (vec(model) - vec(center)) / 3
    np.testing.assert_allclose(vec(bounded), ref, rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(vec(bounded) - vec(center)) == pytest.approx(norm / 3, rel=1e-5)
    for key in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        np.testing.assert_array_equal(bounded[key], model[key])  # statistics untouched
    same, _ = bound_update_norm(model, center, norm * 2)
    assert all(same[k] is model[k] for k in model)


def test_norm_bound_needs_a_global_model():
    with pytest.raises(ValueError, match="global model"):
        bound_update_norm({"w": np.ones(2)}, {}, 1.0)


def test_norm_bound_applies_to_plain_fedavg_and_is_recorded():
    rng = np.random.default_rng(1)
    global_model = random_models(rng, 1)[0]
    honest = [{k: v + 0.01 * np.ones_like(v) for k, v in global_model.items()} for _ in range(4)]
    boosted = {k: v + 100.0 for k, v in global_model.items()}  # a model-replacement-sized update
    strategy = prepared(VideoStrategy(transforms=[NormBound(1.0)], min_train_nodes=1), global_model)
    report = strategy.train_round(1, replies([*honest, boosted]))
    assert report.fusion["norm-bound"]["clipped-nodes"] == [5]
    assert report.fusion["norm-bound"]["update-norm-max"] == pytest.approx(100.0 * math.sqrt(41), rel=1e-5)
    # The boosted client moves the mean by at most bound / 5 (equal counts).
    assert np.linalg.norm(vec(report.arrays) - vec(global_model)) <= 0.01 * math.sqrt(41) + 1.0 / 5 + 1e-5


def test_norm_bound_composes_with_fusion_rules():
    rng = np.random.default_rng(2)
    global_model = random_models(rng, 1)[0]
    models = [{k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in global_model.items()}
              for _ in range(5)]  # fmt: skip
    strategy = prepared(VideoStrategy(Median(), transforms=[NormBound(0.05)], min_train_nodes=1), global_model)
    report = strategy.train_round(1, replies(models))
    assert sorted(report.fusion["norm-bound"]["clipped-nodes"]) == [1, 2, 3, 4, 5]
    bounded = [bound_update_norm(m, global_model, 0.05)[0] for m in models]
    for key in PARAMS:
        np.testing.assert_allclose(report.arrays[key], coordinate_median(bounded)[key], rtol=1e-6)


# --- nearest neighbour mixing ------------------------------------------------------------------


def reference_nnm(models, f):
    # Written from the paper's definition: y_i = mean of the N − f points nearest to x_i (x_i included).
    points = [vec(m) for m in models]
    out = []
    for x in points:
        order = sorted(range(len(points)), key=lambda j: (float(np.sum((points[j] - x) ** 2)), j))
        out.append(np.mean([points[j] for j in order[: len(points) - f]], axis=0))
    return out


@pytest.mark.parametrize("seed,n,f", [(0, 5, 1), (1, 10, 3), (2, 7, 0), (3, 4, 3)])
def test_nnm_equals_the_papers_definition(seed, n, f):
    rng = np.random.default_rng(seed)
    models = random_models(rng, n, with_bn=True)
    mixed, neighbours = nearest_neighbor_mixing(models, f)
    for i, (y, ref) in enumerate(zip(mixed, reference_nnm(models, f))):
        np.testing.assert_allclose(vec(y), ref, rtol=1e-5, atol=1e-6)
        assert len(neighbours[i]) == n - f and neighbours[i][0] == i  # itself first, at distance 0
        # BatchNorm statistics follow the same neighbours; the counter is rounded, dtypes kept.
        stats = np.mean([models[j]["bn.running_mean"].astype(np.float64) for j in neighbours[i]], axis=0)
        np.testing.assert_allclose(y["bn.running_mean"], stats, rtol=1e-6)
        assert y["bn.num_batches_tracked"].dtype == np.int64 and y["conv.weight"].dtype == np.float32
    if f == 0:  # every model mixes all N: each mixture is the plain mean
        assert all(sorted(group) == list(range(n)) for group in neighbours)


def test_nnm_then_median_removes_boosted_sign_flips():
    # Noisy honest updates around +1 and 3 of 10 clients sending them reversed ×10: the plain median
    # is pulled well below the honest mean; after NNM each honest client is the mean of the 7
    # honest ones, so the median of the mixtures is the honest mean.
    rng = np.random.default_rng(0)
    honest = [{"w": (1.0 + 3.0 * rng.normal(size=400)).astype(np.float32)} for _ in range(7)]
    attackers = [{"w": (-10.0 * (1.0 + 3.0 * rng.normal(size=400))).astype(np.float32)} for _ in range(3)]
    models = attackers + honest
    honest_mean = np.mean([m["w"] for m in honest], axis=0)
    plain = coordinate_median(models)["w"]
    strategy = VideoStrategy(Median(), transforms=[NearestNeighbourMixing(3)], min_train_nodes=1)
    report = prepared(strategy, {"w": np.zeros(400, np.float32)}).train_round(1, replies(models))
    np.testing.assert_allclose(report.arrays["w"], honest_mean, rtol=1e-5, atol=1e-5)
    assert np.linalg.norm(plain - honest_mean) > 10 * np.linalg.norm(report.arrays["w"] - honest_mean) + 1.0
    for group in report.fusion["nnm-neighbours"][3:]:  # honest nodes 4..10 mix only each other
        assert sorted(group) == list(range(4, 11))


# --- config --------------------------------------------------------------------------------------


def unused(key_value, owner, needs):
    """The refusal of a key set while its stage is out of use: it names the key, its value, the stage
    and what the stage needs."""
    return re.escape(f"{key_value} belongs to {owner}, which this config does not use: it acts only with {needs}")


MIXING = 'strategy="fusion" and a fusion-fn other than "feddf"'


def test_config_defaults_and_refusals():
    cfg = parse_config({}, check_paths=False)
    assert (cfg.bucket_size, cfg.cc_radius, cfg.cc_iterations, cfg.norm_bound) == (1, 10.0, 1, 0.0)
    bulyan_ok = {"strategy": "fusion", "fusion-fn": "bulyan", "min-train-nodes": 7, "min-available-nodes": 7}
    assert parse_config({**bulyan_ok, "krum-malicious": 1}, check_paths=False).fusion_fn == "bulyan"
    refused = [
        ({**bulyan_ok, "krum-malicious": 2}, "4·2\\+3"),
        (
            {"strategy": "fusion", "cc-radius": 3.0},
            unused(
                "cc-radius=3.0",
                'aggregator "centered-clipping"',
                'strategy="fusion" and fusion-fn="centered-clipping"',
            ),
        ),
        ({"strategy": "fusion", "fusion-fn": "centered-clipping", "cc-radius": 0.0}, "cc-radius"),
        ({"strategy": "fusion", "fusion-fn": "centered-clipping", "cc-iterations": 0}, "cc-iterations"),
        ({"bucket-size": 2}, unused("bucket-size=2", 'transform "bucketing"', MIXING)),
        ({"strategy": "fusion", "bucket-size": 0}, "bucket-size"),
        ({**bulyan_ok, "bucket-size": 4}, "at most 3"),
        ({"norm-bound": -1.0}, "norm-bound"),
        ({"nnm-malicious": 2}, unused("nnm-malicious=2", 'transform "nnm"', MIXING)),
        ({"client-momentum": 1.0}, "client-momentum"),
        ({"strategy": "fusion", "nnm-malicious": -1}, "nnm-malicious"),
        ({"strategy": "fusion", "nnm-malicious": 2, "bucket-size": 2}, "two alternative"),
        (
            {"strategy": "fusion", "fusion-fn": "feddf", "nnm-malicious": 2},
            unused("nnm-malicious=2", 'transform "nnm"', MIXING),
        ),
        (
            {"strategy": "fusion", "fusion-fn": "centered-clipping", "krum-malicious": 2},
            unused(
                "krum-malicious=2",
                'aggregator "bulyan" / aggregator "krum"',
                'strategy="fusion" and fusion-fn="bulyan" or strategy="fusion" and fusion-fn="krum"',
            ),
        ),
    ]
    for run_config, message in refused:
        with pytest.raises(ConfigError, match=message):
            parse_config(run_config, check_paths=False)
    assert parse_config({"norm-bound": 2.0}, check_paths=False).norm_bound == 2.0  # acts with every strategy


# --- adaptive robust clipping (ARC) -----------------------------------------------------------------


def arc_reference(updates: list[np.ndarray], f: int) -> list[np.ndarray]:
    """ARC as Allouah et al. (ICLR 2025, Algorithm 2) write it, on flat update vectors."""
    n = len(updates)
    k = math.floor(2 * (f / n) * (n - f))
    norms = sorted((np.linalg.norm(u) for u in updates), reverse=True)
    c = norms[k]
    return [u * min(1.0, c / np.linalg.norm(u)) for u in updates]


@pytest.mark.parametrize(("seed", "n", "f"), [(0, 10, 3), (1, 7, 2), (2, 5, 1), (3, 10, 1)])
def test_arc_equals_the_papers_algorithm(seed, n, f):
    from strategies.defences import adaptive_robust_clipping, arc_clipped_count

    rng = np.random.default_rng(seed)
    center = random_models(rng, 1, with_bn=True)[0]
    models = [
        {k: (center[k] + rng.uniform(0.1, 5) * v) if k in PARAMS else v for k, v in m.items()}
        for m in random_models(rng, n, with_bn=True)
    ]
    clipped, threshold, indices = adaptive_robust_clipping(models, center, f)
    expected = arc_reference([vec(m) - vec(center) for m in models], f)
    for got, want, original in zip(clipped, expected, models):
        np.testing.assert_allclose(vec(got) - vec(center), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got["bn.running_var"], original["bn.running_var"])  # statistics pass
    k = math.floor(2 * (f / n) * (n - f))
    assert len(indices) == k == arc_clipped_count(n, f)
    assert threshold == pytest.approx(sorted(np.linalg.norm(vec(m) - vec(center)) for m in models)[n - k - 1])


def test_arc_bounds_boosted_attackers_through_the_strategy_and_is_recorded():
    from strategies.transforms.arc import AdaptiveRobustClipping

    rng = np.random.default_rng(4)
    global_model = random_models(rng, 1)[0]
    honest = [{k: v + 0.01 * rng.normal(size=v.shape).astype(v.dtype) for k, v in global_model.items()}
              for _ in range(7)]  # fmt: skip
    boosted = [{k: v - 100.0 for k, v in global_model.items()} for _ in range(3)]
    strategy = prepared(VideoStrategy(transforms=[AdaptiveRobustClipping(3)], min_train_nodes=1), global_model)
    report = strategy.train_round(1, replies([*honest, *boosted]))
    arc = report.fusion["arc"]
    assert set(arc["clipped-nodes"]) >= {8, 9, 10}  # k = ⌊2·0.3·7⌋ = 4: the attackers and the largest honest
    honest_norms = [np.linalg.norm(vec(h) - vec(global_model)) for h in honest]
    assert arc["threshold"] <= max(honest_norms) + 1e-6
    # Three boosted sign flips move the mean by at most 3/10 of an honest norm, instead of 30.
    assert np.linalg.norm(vec(report.arrays) - vec(global_model)) <= 0.3 * max(honest_norms) + 0.01 * 5
    assert not parse_config({}, check_paths=False).arc_malicious
    with pytest.raises(ConfigError, match="arc-malicious"):
        parse_config({"arc-malicious": -1}, check_paths=False)

import numpy as np
import pytest
from flwr.app import MetricRecord

from strategies.weighting import WEIGHT_SOURCES, WeightError, client_weights, normalize_weights


def test_num_examples_and_node_weights_are_normalized_counts():
    metrics = [
        {"num-examples": 10, "node-weight": 2.0},
        {"num-examples": 30, "node-weight": 1.0},
        {"num-examples": 60, "node-weight": 1.0},
    ]
    np.testing.assert_allclose(client_weights("num-examples", metrics), [0.1, 0.3, 0.6], rtol=1e-15)
    np.testing.assert_allclose(client_weights("node", metrics), [0.5, 0.25, 0.25], rtol=1e-15)


def test_flower_metric_records_work_as_metrics():
    metrics = [MetricRecord({"num-examples": 1}), MetricRecord({"num-examples": 3})]
    np.testing.assert_allclose(client_weights("num-examples", metrics), [0.25, 0.75], rtol=1e-15)


def test_inverse_loss_gives_lower_loss_more_weight():
    losses = [0.5, 1.0, 2.0]
    out = client_weights("inverse-loss", [{"train-loss": x} for x in losses])
    expected = np.exp(-np.array(losses)) / np.exp(-np.array(losses)).sum()
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    assert out[0] > out[1] > out[2]


def test_inverse_loss_does_not_underflow_for_large_losses():
    # exp(-1000) is 0.0 in float64; the weights must still be the ratio e^-1000 : e^-1001.
    out = client_weights("inverse-loss", [{"train-loss": 1000.0}, {"train-loss": 1001.0}])
    np.testing.assert_allclose(out, [1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1))], rtol=1e-12)


def test_accuracy_prefers_validation_accuracy():
    metrics = [{"val-accuracy": 0.8, "train-accuracy": 0.1}, {"train-accuracy": 0.4}]
    np.testing.assert_allclose(client_weights("accuracy", metrics), [2 / 3, 1 / 3], rtol=1e-12)
    with pytest.raises(WeightError, match=r"client 1.*'val-accuracy' or 'train-accuracy'"):
        client_weights("accuracy", [{"val-accuracy": 0.5}, {"train-loss": 1.0}])


def test_staleness_decays_with_rounds_behind():
    metrics = [{"base-round": 10}, {"base-round": 9}, {"base-round": 7}, {}]
    out = client_weights("staleness", metrics, server_round=10, staleness_decay=0.5)
    raw = np.array([1.0, 0.5, 0.125, 1.0])  # no base-round: staleness 0
    np.testing.assert_allclose(out, raw / raw.sum(), rtol=1e-12)
    # All very stale: 0.5**10000 underflows, the ratios must survive.
    far = client_weights("staleness", [{"base-round": 0}, {"base-round": 1}], server_round=10_000)
    np.testing.assert_allclose(far, [1 / 3, 2 / 3], rtol=1e-12)
    assert np.all(client_weights("staleness", metrics, server_round=10, staleness_decay=1.0) == 0.25)


def test_staleness_rejects_future_rounds_and_bad_decay():
    with pytest.raises(WeightError, match="client 1: base-round 5 is after server round 3"):
        client_weights("staleness", [{"base-round": 3}, {"base-round": 5}], server_round=3)
    for decay in (0.0, -0.5, 1.5):
        with pytest.raises(WeightError, match="decay"):
            client_weights("staleness", [{}], server_round=3, staleness_decay=decay)


def test_missing_metric_names_client_and_key():
    with pytest.raises(WeightError, match="client 2: reply has no 'node-weight' metric"):
        client_weights("node", [{"node-weight": 1}, {"node-weight": 1}, {"num-examples": 5}])
    with pytest.raises(WeightError, match="client 0.*'train-loss'"):
        client_weights("inverse-loss", [{}])


def test_non_numeric_and_non_finite_metrics_are_rejected():
    with pytest.raises(WeightError, match="client 1: metric 'num-examples' is 'ten'"):
        client_weights("num-examples", [{"num-examples": 1}, {"num-examples": "ten"}])
    with pytest.raises(WeightError, match="not a number"):
        client_weights("num-examples", [{"num-examples": True}])
    with pytest.raises(WeightError, match="client 0: metric 'train-loss' is nan"):
        client_weights("inverse-loss", [{"train-loss": float("nan")}, {"train-loss": 1.0}])


def test_unknown_source_lists_the_allowed_ones():
    with pytest.raises(WeightError) as err:
        client_weights("loss", [{"num-examples": 1}])
    assert all(source in str(err.value) for source in WEIGHT_SOURCES)


def test_normalize_weights_errors_name_the_client():
    np.testing.assert_allclose(normalize_weights([1, 0, 3]), [0.25, 0.0, 0.75], rtol=1e-15)
    cases = {
        "client 1: weight -1.0 is negative": [1.0, -1.0],
        "client 2: weight nan is not finite": [1.0, 2.0, float("nan")],
        "client 0: weight inf is not finite": [float("inf"), 1.0],
        "all 3 client weights are zero": [0, 0, 0],
        "one weight per client": [],
    }
    for message, weights in cases.items():
        with pytest.raises(WeightError, match=message):
            normalize_weights(weights)
    # Negative weights through a source are caught too.
    with pytest.raises(WeightError, match="client 0: weight -2.0 is negative"):
        client_weights("node", [{"node-weight": -2.0}, {"node-weight": 1.0}])
    assert issubclass(WeightError, ValueError)


def test_huge_weights_do_not_overflow():
    np.testing.assert_allclose(normalize_weights([1e308, 1e308]), [0.5, 0.5], rtol=1e-15)

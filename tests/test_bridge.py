import numpy as np
import pytest
from fedapp.client.bridge import EVALUATE, FIT, NamedNumPyClient, call_numpy_client, to_metric_record
from strategies.records import arrays_to_numpy
from tests.flower_messages import instruction


class DoublingClient(NamedNumPyClient):
    """Its model's tensors are ``a.weight`` then ``a.bias`` (the state_dict order)."""

    def __init__(self):
        self.seen_config = None
        self.seen_parameters = None

    def state_keys(self):
        return ["a.weight", "a.bias"]

    def fit(self, parameters, config):
        self.seen_config = config
        self.seen_parameters = parameters
        return [p * 2 for p in parameters], 7, {"train-loss": np.float32(0.5), "class-counts": np.array([3, 4])}

    def evaluate(self, parameters, config):
        return 0.25, 5, {"video-accuracy": 0.8}


GLOBAL = {"a.weight": np.ones((2, 2), np.float32), "a.bias": np.arange(2, dtype=np.float32)}


def test_fit_keeps_tensor_names_and_wraps_metrics():
    client = DoublingClient()
    out = call_numpy_client(client, instruction(3, GLOBAL), FIT)
    arrays = arrays_to_numpy(out.content["arrays"])
    assert list(arrays) == list(GLOBAL)
    np.testing.assert_array_equal(arrays["a.bias"], GLOBAL["a.bias"] * 2)
    metrics = dict(out.content["metrics"])
    assert metrics["num-examples"] == 7 and metrics["class-counts"] == [3, 4]
    assert isinstance(metrics["train-loss"], float)
    assert client.seen_config["server-round"] == 1
    assert out.metadata.dst_node_id == 0 and out.metadata.src_node_id == 3


def test_evaluate_returns_loss_and_count():
    out = call_numpy_client(DoublingClient(), instruction(3, GLOBAL, "evaluate"), EVALUATE)
    assert dict(out.content["metrics"]) == {"video-accuracy": 0.8, "loss": 0.25, "num-examples": 5}
    assert "arrays" not in out.content


def test_wrong_array_count_and_bad_metrics_raise():
    class Broken(DoublingClient):
        def fit(self, parameters, config):
            return parameters[:1], 1, {}

    with pytest.raises(ValueError, match="1 arrays for 2 tensors"):
        call_numpy_client(Broken(), instruction(1, GLOBAL), FIT)
    with pytest.raises(TypeError, match="not a number"):
        to_metric_record({"name": "x"}, 1)
    with pytest.raises(ValueError, match="phase"):
        call_numpy_client(DoublingClient(), instruction(1, GLOBAL), "query")


def test_arrays_travel_by_name_whatever_their_order_in_the_record():
    """A record in another order (a checkpoint read back from safetensors comes in name order:
    ``a.bias`` before ``a.weight``) reaches the client in its own state_dict order."""
    reordered = {"a.bias": GLOBAL["a.bias"], "a.weight": GLOBAL["a.weight"]}
    client = DoublingClient()
    out = call_numpy_client(client, instruction(3, reordered), FIT)
    assert [p.shape for p in client.seen_parameters] == [(2, 2), (2,)]
    arrays = arrays_to_numpy(out.content["arrays"])
    np.testing.assert_array_equal(arrays["a.weight"], GLOBAL["a.weight"] * 2)
    np.testing.assert_array_equal(arrays["a.bias"], GLOBAL["a.bias"] * 2)


def test_a_model_with_other_tensor_names_is_refused():
    other = {"a.weight": GLOBAL["a.weight"], "b.bias": GLOBAL["a.bias"]}
    with pytest.raises(ValueError, match=r"missing tensors \['a.bias'\].*unexpected tensors \['b.bias'\]"):
        call_numpy_client(DoublingClient(), instruction(1, other), FIT)
    with pytest.raises(ValueError, match="missing tensors"):
        call_numpy_client(DoublingClient(), instruction(1, {"a.weight": GLOBAL["a.weight"]}, "evaluate"), EVALUATE)

"""The Message <-> NumPyClient bridge, and the one conversion per side it shares with the mods."""

import importlib

import numpy as np
import pytest
from flwr.app import Array, Context, RecordDict

from fedapp.client import app as client_app
from fedapp.client.bridge import (
    EVALUATE,
    FIT,
    NamedNumPyClient,
    call_numpy_client,
    to_metric_record,
)
from fedapp.client.exchange import message_exchange
from fedapp.task import config as task_config
from strategies import records
from strategies.compression import decompress
from strategies.privacy_budget import update_norm
from strategies.records import NamedArrays, arrays_to_numpy, numpy_to_arrays
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


# --- one conversion per side: the named-array view and the message's exchange ---------------------------


def test_named_arrays_convert_each_form_once_and_keep_names_and_order(monkeypatch):
    calls = []
    for name in ("arrays_to_numpy", "numpy_to_arrays"):
        original = getattr(records, name)
        monkeypatch.setattr(records, name, lambda arg, _f=original, _n=name: calls.append((_n, list(arg))) or _f(arg))

    record = numpy_to_arrays(GLOBAL)
    received = NamedArrays(record)
    assert received.names == ["a.weight", "a.bias"] and calls == []  # nothing decoded until asked
    first, second = received.numpy(), received.numpy()
    assert calls == [("arrays_to_numpy", ["a.weight", "a.bias"])] and first["a.bias"] is second["a.bias"]
    assert received.record() is record  # a model that came as a record leaves as that record

    calls.clear()
    update = NamedArrays(numpy={k: v * 2 for k, v in GLOBAL.items()})
    assert update.record() is update.record() and calls == [("numpy_to_arrays", ["a.weight", "a.bias"])]
    np.testing.assert_array_equal(arrays_to_numpy(update.record())["a.bias"], GLOBAL["a.bias"] * 2)

    calls.clear()
    bias = update.select(["a.bias"])
    assert bias.names == ["a.bias"] and bias.record()["a.bias"] is update.record()["a.bias"] and calls == []
    merged = received.updated(NamedArrays(numpy={"a.bias": np.zeros(2, np.float32)}))
    assert merged.names == ["a.weight", "a.bias"]
    assert merged.record()["a.weight"] is record["a.weight"]  # untouched tensors keep their Arrays
    assert calls == [("numpy_to_arrays", ["a.bias"])]
    with pytest.raises(KeyError):
        received.select(["b.bias"])
    with pytest.raises(KeyError):
        received.updated(NamedArrays(numpy={"b.bias": np.zeros(2)}))
    with pytest.raises(TypeError):
        NamedArrays()


def test_an_inner_layer_leaves_the_reply_model_to_the_outermost_one():
    """Inside an enclosing layer's exchange the bridge's reply carries no arrays yet: they are written
    once, when the reply leaves the layer that opened the exchange."""
    msg = instruction(3, GLOBAL)
    with message_exchange(msg) as exchange:
        out = call_numpy_client(DoublingClient(), msg, FIT)
        assert "arrays" not in out.content
        assert list(exchange.reply_arrays(out)["arrays"].numpy()) == list(GLOBAL)
    np.testing.assert_array_equal(arrays_to_numpy(out.content["arrays"])["a.weight"], GLOBAL["a.weight"] * 2)


MODEL = {
    "conv.weight": np.random.default_rng(0).normal(size=(8, 4, 3, 3)).astype(np.float32),
    "bn.running_var": np.ones(8, np.float32),
    "bn.num_batches_tracked": np.array(3, np.int64),
}
FLOATS, COUNTERS = ["conv.weight", "bn.running_var"], ["bn.num_batches_tracked"]


class StepClient(NamedNumPyClient):
    """Moves every tensor by one (the counters too), like a round of training would."""

    def __init__(self):
        self.local_state = {}  # what the handler saves as FedBN state: nothing here

    def state_keys(self):
        return list(MODEL)

    def fit(self, parameters, config):
        return [p + 1 for p in parameters], 4, {}

    def evaluate(self, parameters, config):
        return 0.5, 4, {}


@pytest.fixture
def counted(monkeypatch):
    """The real ClientApp (compression_mod -> dp_clipping_mod -> handler -> bridge) around a StepClient,
    with every model conversion, every Flower (de)serialization and every parse_config counted."""
    monkeypatch.setattr(client_app, "make_client", lambda cfg, node_config, *rest: StepClient())
    seen = {"decode": [], "encode": [], "np.load": 0, "np.save": 0, "parse_config": 0}
    wrapped = {
        "arrays_to_numpy": lambda arg, _f=records.arrays_to_numpy: seen["decode"].append(dict(arg)) or _f(arg),
        "numpy_to_arrays": lambda arg, _f=records.numpy_to_arrays: seen["encode"].append(list(arg)) or _f(arg),
    }

    def parse(*args, _f=task_config.parse_config, **kwargs):
        seen["parse_config"] += 1
        return _f(*args, **kwargs)

    # Every binding of the conversions and of parse_config on the client side: a layer converting or
    # parsing on its own, around the shared view, is counted too.
    names = ("app", "bridge", "compression", "compression_mod", "dp_mod", "exchange", "video_client")
    for module in [records, *(importlib.import_module(f"fedapp.client.{n}") for n in names)]:
        for name, fn in wrapped.items():
            if hasattr(module, name):
                monkeypatch.setattr(module, name, fn)
        if hasattr(module, "parse_config"):
            monkeypatch.setattr(module, "parse_config", parse)
    numpy, from_numpy = Array.numpy, Array.__dict__["from_numpy_ndarray"].__func__
    monkeypatch.setattr(Array, "numpy", lambda self: seen.__setitem__("np.load", seen["np.load"] + 1) or numpy(self))
    monkeypatch.setattr(
        Array,
        "from_numpy_ndarray",
        classmethod(lambda cls, nd: seen.__setitem__("np.save", seen["np.save"] + 1) or from_numpy(cls, nd)),
    )
    return client_app.app, seen


@pytest.mark.parametrize("compression", ["none", "int8"])
@pytest.mark.parametrize("dp", [False, True])
def test_each_side_converts_once_through_the_whole_mod_chain(counted, compression, dp):
    """Per train message: the sent model is decoded once (for compression's reference, the DP mod and
    the bridge alike) and the reply's model encoded once, as it leaves. With client-side DP, Flower's
    ``fixedclipping_mod`` works on ArrayRecords: the float tensors are encoded once for it (the sent
    ones it gets as they came) and, when compression follows, its clipped output is decoded once;
    what the mod converts inside is Flower's. (Before this view, int8 + DP cost 6 decodes and 5
    encodes of the model, 21 np.load and 17 np.save, and 2 parse_config.)"""
    app, seen = counted
    msg = instruction(1, MODEL)
    if dp:
        msg.content["config"]["clipping_norm"] = 0.5
    sent = msg.content["arrays"]
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={"compression": compression})
    seen.update({"decode": [], "encode": [], "np.load": 0, "np.save": 0})  # building the message is the server's

    out = app(msg, context)

    assert not out.has_error()
    incoming = [d for d in seen["decode"] if all(sent[k] is a for k, a in d.items())]
    reply_decodes = [list(d) for d in seen["decode"] if d not in incoming]
    assert [list(d) for d in incoming] == [list(MODEL)]  # the sent model: decoded once, for every layer
    payload = list(out.content["arrays"])
    if compression == "int8":
        assert payload == [
            "conv.weight::int8",
            "conv.weight::scale",
            "bn.running_var::int8",
            "bn.running_var::scale",
            "bn.num_batches_tracked",
        ]
    else:
        assert payload == list(MODEL)
    if not dp:
        assert seen["encode"] == [payload] and reply_decodes == []  # the reply: encoded once, leaving
    elif compression == "none":
        # Floats encoded for Flower's mod, whose clipped Arrays leave as they are; the counters, as they leave.
        assert seen["encode"] == [FLOATS, COUNTERS] and reply_decodes == []
    else:
        assert seen["encode"] == [FLOATS, payload] and reply_decodes == [FLOATS]
    # Nothing else (de)serializes: every np.load / np.save is one of the above or Flower's mod's own
    # (it decodes the sent and the returned floats and encodes the clipped ones).
    flower = len(FLOATS) if dp else 0
    assert seen["np.load"] == sum(len(d) for d in seen["decode"]) + 2 * flower
    assert seen["np.save"] == sum(len(e) for e in seen["encode"]) + flower
    assert seen["parse_config"] == 1  # once per message, shared by the compression mod and the handler
    # And what leaves is right: the floats clipped to the norm (or moved by one), the counters stepped.
    leaving = decompress(arrays_to_numpy(out.content["arrays"]), MODEL)
    moved = update_norm({k: leaving[k] for k in FLOATS}, MODEL)
    assert moved == pytest.approx(0.5 if dp else np.sqrt(sum(MODEL[k].size for k in FLOATS)), rel=1e-2)
    assert leaving["bn.num_batches_tracked"] == MODEL["bn.num_batches_tracked"] + 1


def test_an_evaluate_message_is_decoded_once_and_parsed_once(counted):
    app, seen = counted
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={"compression": "int8"})
    msg = instruction(1, MODEL, "evaluate")
    seen.update({"decode": [], "encode": [], "np.load": 0, "np.save": 0})
    out = app(msg, context)
    assert dict(out.content["metrics"]) == {"loss": 0.5, "num-examples": 4}
    assert [list(d) for d in seen["decode"]] == [list(MODEL)] and seen["encode"] == []
    assert seen["np.load"] == len(MODEL) and seen["np.save"] == 0
    assert seen["parse_config"] == 1

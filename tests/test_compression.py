"""Update compression: round trips, error feedback, fallbacks, malformed payloads, byte counts, the
client mod, the server-side decoding in the strategy, and the round loop's bytes-up."""

import math

import numpy as np
import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict

from fedapp.client.compression import TOPK_MIN_ELEMENTS, compress, topk_count
from fedapp.client.compression_mod import RESIDUAL_KEY, compression_mod
from fedapp.task.config import ConfigError, parse_config
from strategies.aggregation import fedavg
from strategies.compression import METHODS, SEP, decompress, payload_bytes
from strategies.records import arrays_to_numpy, numpy_to_arrays
from strategies.strategy import VideoStrategy
from tests.flower_messages import error_reply, instruction, reply

EPS16 = float(np.finfo(np.float16).eps)
EPS32 = float(np.finfo(np.float32).eps)


def global_model(rng):
    return {
        "conv.weight": rng.normal(size=(16, 8, 3, 3)).astype(np.float32),  # above TOPK_MIN_ELEMENTS
        "conv.bias": rng.normal(size=(8,)).astype(np.float32),
        "bn.running_var": rng.uniform(0.5, 2.0, size=(8,)).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "temperature": np.array(1.5, dtype=np.float32),  # a 0-d float
    }


def trained(model, rng, step=0.01):
    """A plausible local update: small float deltas, the step counter advanced."""
    out = {}
    for key, value in model.items():
        if np.issubdtype(value.dtype, np.floating):
            out[key] = np.asarray(value + step * rng.normal(size=value.shape).astype(np.float32), dtype=np.float32)
        else:
            out[key] = np.asarray(value + 5)
    return out


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    ref = global_model(rng)
    return ref, trained(ref, rng)


# --- round trips -----------------------------------------------------------------------------------


def test_none_sends_the_update_itself(pair):
    ref, upd = pair
    payload, residual = compress(upd, ref, "none")
    assert list(payload) == list(upd) and residual == {}
    for key in upd:
        assert payload[key] is upd[key] or np.array_equal(payload[key], upd[key])


def test_fp16_round_trip_within_half_precision(pair):
    ref, upd = pair
    payload, residual = compress(upd, ref, "fp16")
    assert residual == {}
    assert payload["conv.weight::fp16"].dtype == np.float16
    restored = decompress(payload, ref)
    assert list(restored) == list(upd)
    for key in ("conv.weight", "conv.bias", "bn.running_var", "temperature"):
        delta = upd[key] - ref[key]
        assert restored[key].dtype == np.float32 and restored[key].shape == upd[key].shape
        # float16 rounds the delta to half an ulp; adding it back to the float32 weight costs one more rounding.
        bound = EPS16 / 2 * np.abs(delta) + EPS32 * np.abs(upd[key]) + 1e-12
        assert (np.abs(restored[key] - upd[key]) <= bound).all(), key


def test_int8_round_trip_within_half_a_step(pair):
    ref, upd = pair
    payload, residual = compress(upd, ref, "int8")
    assert residual == {}
    for key in ("conv.weight", "conv.bias", "bn.running_var"):
        q, scale = payload[key + SEP + "int8"], payload[key + SEP + "scale"]
        assert q.dtype == np.int8 and q.shape == upd[key].shape
        assert scale.dtype == np.float32 and scale.shape == ()
        delta = upd[key] - ref[key]
        assert np.isclose(scale, np.abs(delta).max() / 127, rtol=1e-6)
        assert np.abs(q).max() == 127  # symmetric: the largest delta uses the full range
        restored = decompress(payload, ref)[key]
        assert restored.dtype == np.float32
        assert (np.abs(restored - upd[key]) <= scale / 2 * (1 + 1e-5) + EPS32 * np.abs(upd[key])).all(), key


def test_topk_sends_the_largest_deltas_exactly_and_keeps_the_rest(pair):
    ref, upd = pair
    fraction = 0.1
    payload, residual = compress(upd, ref, "topk", fraction)
    key = "conv.weight"
    delta = (upd[key] - ref[key]).reshape(-1)
    idx, val = payload[key + "::idx"], payload[key + "::val"]
    k = math.ceil(fraction * delta.size)
    assert idx.dtype == np.int32 and idx.shape == (k,) and val.dtype == np.float32
    assert np.all(np.diff(idx) > 0)  # sorted, unique
    assert np.abs(delta[idx]).min() >= np.delete(np.abs(delta), idx).max()  # the k largest |delta|
    np.testing.assert_array_equal(val, delta[idx])
    restored = decompress(payload, ref)[key].reshape(-1)
    flat_ref = ref[key].reshape(-1)
    np.testing.assert_array_equal(restored[idx], flat_ref[idx] + val)
    np.testing.assert_array_equal(np.delete(restored, idx), np.delete(flat_ref, idx))
    # The residual is exactly the part not sent.
    expected_residual = delta.copy()
    expected_residual[idx] = 0
    np.testing.assert_array_equal(residual[key].reshape(-1), expected_residual)
    assert residual[key].shape == ref[key].shape


def test_topk_count_rounds_up_and_ignores_float_noise():
    assert topk_count(100, 0.01) == 1
    assert topk_count(100, 0.07) == 7  # 0.07 * 100 = 7.000000000000001
    assert topk_count(101, 0.01) == 2
    assert topk_count(5, 0.01) == 1
    assert topk_count(5, 1.0) == 5


def test_integer_and_zero_d_tensors_keep_dtype_and_shape(pair):
    ref, upd = pair
    for method in METHODS:
        payload, _ = compress(upd, ref, method, 0.1)
        assert payload["bn.num_batches_tracked"].dtype == np.int64
        assert payload["bn.num_batches_tracked"].shape == ()
        restored = decompress(payload, ref)
        assert restored["bn.num_batches_tracked"].shape == () and restored["bn.num_batches_tracked"] == 12
        assert restored["temperature"].shape == () and restored["temperature"].dtype == np.float32
        # and through Flower's ArrayRecord, as on the wire
        wire = decompress(arrays_to_numpy(numpy_to_arrays(payload)), ref)
        assert {k: (v.shape, v.dtype) for k, v in wire.items()} == {k: (v.shape, v.dtype) for k, v in upd.items()}


def test_decompress_of_plain_arrays_is_the_identity(pair):
    ref, upd = pair
    for reference in (ref, {}):
        restored = decompress(upd, reference)
        assert list(restored) == list(upd)
        assert all(restored[k] is upd[k] for k in upd)


# --- error feedback ----------------------------------------------------------------------------------


def test_error_feedback_sends_every_small_update_eventually():
    # One coordinate moves a lot every round; the others move a little, below the top-k threshold.
    ref = {"w": np.zeros(2000, np.float32)}
    step = np.full(2000, 0.01, np.float32)
    step[0] = 1.0
    residual, sent = {}, np.zeros(2000, np.float64)
    sent_small = set()
    rounds = 300
    for r in range(1, rounds + 1):
        payload, residual = compress({"w": ref["w"] + step}, ref, "topk", 0.01, residual)
        sent += decompress(payload, ref)["w"] - ref["w"]
        sent_small.update(int(i) for i in payload["w::idx"] if i != 0)
        # Nothing is lost: what was sent plus what is held back is everything the client computed.
        np.testing.assert_allclose(sent + residual["w"], r * step.astype(np.float64), rtol=1e-5, atol=1e-5)
    # Without error feedback coordinate 0 would win every round and the others would never be sent.
    assert len(sent_small) > 1000
    assert np.abs(residual["w"]).max() < 2.0


def test_a_residual_of_another_shape_is_ignored():
    ref = {"w": np.zeros(2000, np.float32)}
    payload, residual = compress({"w": np.ones(2000, np.float32)}, ref, "topk", 0.1, {"w": np.ones(3, np.float32)})
    assert payload["w::val"].tolist() == [1.0] * 200 and residual["w"].sum() == 1800.0


def test_topk_sends_small_tensors_whole():
    """Biases and BatchNorm statistics: one entry a round would desynchronise them from the weights."""
    ref = {"bn.running_var": np.ones(TOPK_MIN_ELEMENTS - 1, np.float32), "w": np.zeros(TOPK_MIN_ELEMENTS, np.float32)}
    upd = {k: v + 0.5 for k, v in ref.items()}
    payload, residual = compress(upd, ref, "topk", 0.01)
    assert set(payload) == {"bn.running_var", "w::idx", "w::val"} and set(residual) == {"w"}


# --- fallbacks: sent whole rather than corrupted --------------------------------------------------------


def test_tensors_that_would_not_shrink_or_survive_are_sent_whole():
    ref = {
        "small": np.array([1.0], np.float32),  # int8 + scale (5 bytes) is larger than 4 bytes
        "huge": np.zeros(4, np.float32),  # the delta overflows float16
        "broken": np.zeros(4, np.float32),  # a NaN update must reach the server's checks as such
    }
    upd = {
        "small": np.array([2.0], np.float32),
        "huge": np.full(4, 1e6, np.float32),
        "broken": np.array([0, np.nan, 0, 0], np.float32),
    }
    fp16, _ = compress(upd, ref, "fp16")
    assert "huge" in fp16 and "broken" in fp16 and "small::fp16" in fp16
    int8, _ = compress(upd, ref, "int8")
    assert "small" in int8 and "broken" in int8 and "huge::int8" in int8
    topk, residual = compress(upd, ref, "topk", 1.0)  # k = n: the sparse form is larger than the dense one
    assert set(topk) == set(upd) and residual == {}


def test_rounding_never_makes_a_non_negative_tensor_negative():
    ref = {"bn.running_var": np.array([10.0, 0.05, 1.0, 1.0], np.float32)}
    upd = {"bn.running_var": np.array([0.0, 0.01, 1.0, 1.0], np.float32)}
    # int8 step 10/127 ≈ 0.079: the 0.05 -> 0.01 change would round to 0.05 - 0.079 < 0.
    payload, _ = compress(upd, ref, "int8")
    assert "bn.running_var" in payload
    np.testing.assert_array_equal(decompress(payload, ref)["bn.running_var"], upd["bn.running_var"])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="zip"):
        compress({}, {}, "zip")
    with pytest.raises(ValueError, match="fraction"):
        compress({}, {}, "topk", 0.0)


# --- malformed payloads --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.update({"w::zip": np.zeros(3)}), "unknown suffix"),
        (lambda p: p.update({"w::": np.zeros((4, 5), np.float32)}), "unknown suffix"),
        (lambda p: p.pop("w::scale"), "do not form one encoding"),
        (lambda p: p.update({"w": np.zeros((4, 5), np.float32)}), "do not form one encoding"),
        (lambda p: p.update({"w::scale": np.array(-1.0, np.float32)}), "scale"),
        (lambda p: p.update({"w::scale": np.array(np.nan, np.float32)}), "scale"),
        (lambda p: p.update({"w::scale": np.ones(2, np.float32)}), "scale"),
        (lambda p: p.update({"w::int8": p["w::int8"].astype(np.int16)}), "int8"),
        (lambda p: p.update({"w::int8": p["w::int8"].reshape(5, 4)}), "shape"),
        (lambda p: p.update({"ghost::fp16": np.zeros(2, np.float16)}), "no such tensor"),
        (lambda p: p.update({"n::fp16": p.pop("n").astype(np.float16)}), "int64"),
    ],
)
def test_malformed_int8_and_fp16_payloads_raise(change, message):
    ref = {"w": np.zeros((4, 5), np.float32), "n": np.array(3, np.int64)}
    payload, _ = compress({"w": np.ones((4, 5), np.float32), "n": ref["n"]}, ref, "int8")
    change(payload)
    with pytest.raises(ValueError, match=message):
        decompress(payload, ref)


@pytest.mark.parametrize(
    ("idx", "val", "message"),
    [
        (np.array([0, 20], np.int32), np.ones(2, np.float32), "outside"),
        (np.array([-1, 3], np.int32), np.ones(2, np.float32), "outside"),
        (np.array([3, 3], np.int32), np.ones(2, np.float32), "repeated"),
        (np.array([1, 2], np.int32), np.ones(3, np.float32), "as long as"),
        (np.array([[1, 2]], np.int32), np.ones(2, np.float32), "1-d integer"),
        (np.array([1.0, 2.0]), np.ones(2, np.float32), "1-d integer"),
        (np.array([1, 2], np.int32), np.ones(2, np.int32), "float"),
    ],
)
def test_malformed_topk_payloads_raise(idx, val, message):
    ref = {"w": np.zeros((4, 5), np.float32)}
    with pytest.raises(ValueError, match=message):
        decompress({"w::idx": idx, "w::val": val}, ref)
    with pytest.raises(ValueError, match="do not form one encoding"):
        decompress({"w::idx": idx}, ref)


def test_wrong_fp16_dtype_is_refused():
    ref = {"w": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match="float16"):
        decompress({"w::fp16": np.zeros(3, np.float32)}, ref)


# --- byte counts ---------------------------------------------------------------------------------------


def test_payload_bytes(pair):
    ref, upd = pair
    floats = [k for k in upd if upd[k].dtype == np.float32 and upd[k].size > 1]
    numel = sum(upd[k].size for k in floats)
    counter = upd["bn.num_batches_tracked"].nbytes
    full = payload_bytes(upd)
    assert full == 4 * numel + 4 + counter  # + the 0-d float
    fp16, _ = compress(upd, ref, "fp16")
    assert payload_bytes(fp16) == 2 * numel + 2 + counter
    int8, _ = compress(upd, ref, "int8")
    # one byte per element plus one float32 scale per tensor; the 0-d float is cheaper sent whole
    assert payload_bytes(int8) == numel + 4 * len(floats) + 4 + counter
    topk, _ = compress(upd, ref, "topk", 0.1)
    ks = {k: topk_count(upd[k].size, 0.1) for k in floats}
    # (int32 index + float32 value) per kept entry; tensors where that is no smaller go whole
    dense = {name for name, k in ks.items() if 8 * k >= upd[name].nbytes or upd[name].size < TOPK_MIN_ELEMENTS}
    sparse = sum(8 * k for name, k in ks.items() if name not in dense)
    whole = sum(upd[name].nbytes for name in dense)
    assert payload_bytes(topk) == sparse + whole + 4 + counter
    assert payload_bytes(topk) < payload_bytes(int8) < payload_bytes(fp16) < full


# --- config -----------------------------------------------------------------------------------------------


def test_config_keys_are_validated():
    assert parse_config({"compression": "topk", "topk-fraction": 0.05}).topk_fraction == 0.05
    with pytest.raises(ConfigError) as info:
        parse_config({"compression": "zip"})
    for text in ("compression", "zip", "fp16", "int8", "topk"):
        assert text in str(info.value)
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="topk-fraction"):
            parse_config({"topk-fraction": bad})


# --- the client mod ---------------------------------------------------------------------------------------


def node_context(run_config):
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config)


def answering(update, metrics=None):
    """A stand-in for the ClientApp: replies to a train message with ``update``."""
    calls = []

    def app(msg, context):
        calls.append(msg)
        content = RecordDict(
            {"arrays": numpy_to_arrays(update), "metrics": MetricRecord(metrics or {"num-examples": 4})}
        )
        return Message(content=content, reply_to=msg)

    return app, calls


def test_mod_compresses_train_replies_and_keeps_the_residual_across_rounds(pair):
    ref, upd = pair
    context = node_context({"compression": "topk", "topk-fraction": 0.1})
    context.state["local-state"] = numpy_to_arrays({"bn.running_var": ref["bn.running_var"]})  # FedBN's, untouched

    app, _ = answering(upd)
    out = compression_mod(instruction(1, ref), context, app)
    payload = arrays_to_numpy(out.content["arrays"])
    expected, residual = compress(upd, ref, "topk", 0.1)
    assert list(payload) == list(expected)
    for key in expected:
        np.testing.assert_array_equal(payload[key], expected[key])
    stored = arrays_to_numpy(context.state[RESIDUAL_KEY])
    assert list(stored) == list(residual)
    np.testing.assert_array_equal(stored["conv.weight"], residual["conv.weight"])
    assert dict(out.content["metrics"]) == {"num-examples": 4}
    assert "local-state" in context.state

    # Round 2: the residual of round 1 is added to the new delta.
    upd2 = trained(ref, np.random.default_rng(5))
    app2, _ = answering(upd2)
    out2 = compression_mod(instruction(1, ref), context, app2)
    expected2, residual2 = compress(upd2, ref, "topk", 0.1, residual)
    payload2 = arrays_to_numpy(out2.content["arrays"])
    for key in expected2:
        np.testing.assert_array_equal(payload2[key], expected2[key])
    np.testing.assert_array_equal(arrays_to_numpy(context.state[RESIDUAL_KEY])["conv.weight"], residual2["conv.weight"])


def test_mod_leaves_evaluate_errors_and_uncompressed_runs_alone(pair):
    ref, upd = pair
    app, calls = answering(upd)
    # compression off: the reply is the app's, untouched, and no state is written
    context = node_context({"compression": "none"})
    out = compression_mod(instruction(1, ref), context, app)
    assert list(arrays_to_numpy(out.content["arrays"])) == list(upd) and RESIDUAL_KEY not in context.state
    # evaluate messages pass straight through
    context = node_context({"compression": "int8"})
    evaluate = instruction(1, ref, message_type="evaluate")
    out = compression_mod(
        evaluate, context, lambda m, c: Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=m)
    )
    assert "arrays" not in out.content
    # a failed reply stays the failure it is
    failed = compression_mod(instruction(1, ref), context, lambda m, c: error_reply(1, "no usable video"))
    assert failed.has_error() and "no usable video" in failed.error.reason
    assert len(calls) == 1


def test_mod_encodes_the_final_clipped_update_inside_secagg():
    from fedapp.client.app import app
    from fedapp.client.dp_mod import dp_clipping_mod
    from fedapp.client.secagg_mod import secagg_mod

    # Outside the DP clipping mod, so it encodes the final (clipped) update; secagg_mod, outermost,
    # answers SecAgg+'s steps (secagg refuses compression at start, so the two never meet).
    assert app._mods == [secagg_mod, compression_mod, dp_clipping_mod]


# --- the server side: decode before validation and aggregation ------------------------------------------------


def test_strategy_decodes_aggregates_and_rejects_malformed_compressed_replies(pair):
    ref, _ = pair
    rng = np.random.default_rng(3)
    updates = [trained(ref, rng) for _ in range(3)]
    payloads = [compress(u, ref, m, 0.1)[0] for u, m in zip(updates, ("int8", "topk", "none"))]
    bad = dict(payloads[1])
    bad["conv.weight::idx"] = bad["conv.weight::idx"] + 10_000  # indices past the tensor
    replies = [reply(i + 1, p, {"num-examples": n}) for i, (p, n) in enumerate(zip(payloads, (10, 20, 30)))]
    replies.append(reply(4, bad, {"num-examples": 10}))
    strategy = VideoStrategy(min_available_nodes=1, min_train_nodes=1)
    strategy.set_global(ref)

    report = strategy.train_round(1, replies)
    merged, metrics = report.arrays, report.metrics

    decoded = [decompress(p, ref) for p in payloads]
    expected = fedavg(zip(decoded, (10, 20, 30)))
    for key in expected:
        np.testing.assert_allclose(merged[key], expected[key], rtol=1e-6)
    assert [c.node_id for c in report.accepted] == [1, 2, 3]
    assert [c.payload_bytes for c in report.accepted] == [payload_bytes(p) for p in payloads]
    assert report.rejected[0]["node-id"] == 4
    assert "could not be decoded" in report.rejected[0]["reason"] and "conv.weight" in report.rejected[0]["reason"]
    assert metrics["num-examples"] == 60


def test_a_decoded_update_is_still_validated(pair):
    ref, upd = pair
    payload, _ = compress(upd, ref, "fp16")
    payload["bn.running_var::fp16"] = np.full(8, -60000, np.float16)  # decodes to negative variances
    strategy = VideoStrategy(min_available_nodes=1, min_train_nodes=1)
    strategy.set_global(ref)
    report = strategy.train_round(1, [reply(1, payload, {"num-examples": 5})])
    assert report.arrays is None and "negative variances" in report.rejected[0]["reason"]


# --- the round loop -----------------------------------------------------------------------------------------


def test_round_loop_counts_compressed_bytes_up(small_run_config, tmp_path):
    from bench.inprocess import run_inprocess

    config = {
        **small_run_config,
        "num-server-rounds": 1,
        "fraction-evaluate": 0.0,
        "central-eval": False,
        "compression": "topk",
        "topk-fraction": 0.01,
    }
    record = run_inprocess(config, 2, tmp_path / "run").rounds[1]
    clients = record["train-clients"]
    assert len(clients["clients"]) == 2 and not clients["rejected"] and not clients["failed"]
    model_bytes = record["bytes-down"] / 2
    # ~1 % of the entries at 8 bytes each (index + value) instead of 4, plus small tensors sent whole
    assert 0 < record["bytes-up"] < 2 * 0.05 * model_bytes

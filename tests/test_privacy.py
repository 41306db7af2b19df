"""Differential privacy: Flower's DP wrappers around our strategies, the client clipping mod, and a
DP run through the real server loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from bench.inprocess import run_inprocess
from fedapp.client.dp_mod import dp_clipping_mod
from fedapp.task.config import ConfigError, parse_config
from strategies.aggregators.average import Average
from strategies.aggregators.krum import Krum
from strategies.aggregators.median import Median
from strategies.privacy import PrivateStrategy
from strategies.privacy_budget import clamp_variances, epsilon_spent, split_private, update_norm
from strategies.records import arrays_to_numpy, numpy_to_arrays
from strategies.server_steps.sgd import SGD
from strategies.strategy import VideoStrategy
from tests.flower_messages import ensure_identity, error_reply, instruction, reply


def model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(size=(4, 3)).astype(np.float32),
        "bn.running_mean": np.zeros(4, np.float32),
        "bn.running_var": np.ones(4, np.float32),
        "bn.num_batches_tracked": np.asarray(7, dtype=np.int64),
        "fc.bias": np.zeros(2, np.float32),
    }


def moved(base: dict[str, np.ndarray], scale: float, seed: int, steps: int = 20) -> dict[str, np.ndarray]:
    """A client model: the global one plus a random float update of norm ~``scale``, counters stepped."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, value in base.items():
        if np.issubdtype(value.dtype, np.floating):
            new = value + scale * rng.normal(size=value.shape) / 4
            out[key] = (np.abs(new) if key.endswith("running_var") else new).astype(value.dtype)
        else:
            out[key] = np.asarray(value + steps, dtype=value.dtype)
    return out


class StubGrid:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def configured(strategy, base: dict[str, np.ndarray], n: int) -> list[Message]:
    ensure_identity()
    return list(strategy.configure_train(1, numpy_to_arrays(base), ConfigRecord(), StubGrid(n)))


def private(inner=None, mode="server-side", noise=0.0, clip=1.0) -> PrivateStrategy:
    inner = inner or VideoStrategy(Average(), min_train_nodes=1, min_available_nodes=1)
    return PrivateStrategy(inner, mode, noise_multiplier=noise, clipping_norm=clip, delta=1e-5)


def test_split_private_keeps_model_order_and_sends_counters_aside():
    floats, counters = split_private(model())
    assert list(floats) == ["conv.weight", "bn.running_mean", "bn.running_var", "fc.bias"]
    assert list(counters) == ["bn.num_batches_tracked"]


def test_clamp_variances_only_touches_negative_running_variances():
    arrays = {"bn.running_var": np.array([-0.5, 0.2], np.float32), "w": np.array([-1.0], np.float32)}
    assert clamp_variances(arrays) == 1
    assert arrays["bn.running_var"].tolist() == [0.0, pytest.approx(0.2)]
    assert arrays["w"].tolist() == [-1.0]


def test_epsilon_grows_with_releases_and_shrinks_with_noise():
    assert epsilon_spent(1.0, 0, 1e-5) == 0.0
    one, ten = epsilon_spent(1.0, 1, 1e-5), epsilon_spent(1.0, 10, 1e-5)
    assert 0 < one < ten
    assert epsilon_spent(2.0, 10, 1e-5) < ten


def test_server_side_clipping_bounds_the_update_and_keeps_counters_integer():
    base = model()
    strategy = private(clip=0.5)
    configured(strategy, base, 3)
    replies = [reply(i, moved(base, 5.0, seed=i), {"num-examples": 10}) for i in (1, 2, 3)]
    report = strategy.train_round(1, replies)
    out, metrics = report.arrays, report.metrics
    assert list(out) == list(base)
    floats_out, _ = split_private(out)
    floats_base, _ = split_private(base)
    # The mean of updates clipped to 0.5 moves the model by at most 0.5 (no noise here).
    assert update_norm(floats_out, floats_base) <= 0.5 + 1e-5
    assert out["bn.num_batches_tracked"].dtype == np.int64 and out["bn.num_batches_tracked"] == 27
    assert report.privacy["clipped-updates"] == 3
    assert report.privacy["update-norm-median"] > 0.5
    assert len(report.accepted) == 3
    assert metrics["num-examples"] == 30


def test_noise_has_the_calibrated_standard_deviation():
    base = {"w": np.zeros(20000, np.float32)}
    strategy = private(noise=2.0, clip=0.3)
    configured(strategy, base, 4)
    replies = [reply(i, {"w": base["w"] + 1e-6}, {"num-examples": 5}) for i in range(1, 5)]  # ~zero updates
    report = strategy.train_round(1, replies)
    out = report.arrays["w"]
    expected = 2.0 * 0.3 / 4
    assert report.privacy["noise-stdv"] == pytest.approx(expected)
    assert np.std(out) == pytest.approx(expected, rel=0.05)
    assert strategy.releases == 1 and report.privacy["epsilon"] > 0


def test_noise_that_makes_a_variance_negative_is_clamped():
    base = {"bn.running_var": np.full(5000, 0.01, np.float32)}
    strategy = private(noise=1.0, clip=1.0)
    configured(strategy, base, 2)
    nudged = {"bn.running_var": base["bn.running_var"] + 1e-6}
    report = strategy.train_round(1, [reply(i, nudged, {"num-examples": 1}) for i in (1, 2)])
    assert (report.arrays["bn.running_var"] >= 0).all()
    assert report.privacy["negative-variances-clamped"] > 0


def test_bad_and_failed_replies_are_screened_before_flowers_wrapper():
    """Flower's wrapper skips the whole round on any error reply and crashes on a wrong shape;
    ours drops them, reports them, and noises the mean of the survivors."""
    base = model()
    strategy = private(noise=0.5, clip=1.0)
    configured(strategy, base, 4)
    bad = dict(moved(base, 0.1, seed=9))
    bad["conv.weight"] = np.zeros((5, 5), np.float32)
    replies = [
        reply(1, moved(base, 0.1, seed=1), {"num-examples": 3}),
        reply(2, moved(base, 0.1, seed=2), {"num-examples": 3}),
        reply(3, bad, {"num-examples": 3}),
        error_reply(4, "client crashed"),
    ]
    report = strategy.train_round(1, replies)
    assert report.arrays is not None
    assert len(report.accepted) == 2 and len(report.rejected) == 1 and len(report.failed) == 1
    assert "shape" in report.rejected[0]["reason"]
    assert report.privacy["clients-in-mean"] == 2
    assert report.privacy["noise-stdv"] == pytest.approx(0.5 * 1.0 / 2)


def test_too_few_survivors_keep_the_global_model_and_release_nothing():
    base = model()
    strategy = private(VideoStrategy(Average(), min_train_nodes=2, min_available_nodes=1), noise=1.0)
    configured(strategy, base, 2)
    report = strategy.train_round(1, [reply(1, moved(base, 0.1, seed=1), {"num-examples": 3}), error_reply(2, "x")])
    assert report.arrays is None
    assert "fewer than min-train-nodes" in report.skipped
    assert len(report.failed) == 1
    assert strategy.releases == 0 and report.privacy["releases"] == 0


def test_wraps_any_strategy_but_accounts_only_a_uniform_mean():
    base = model()
    for inner in (VideoStrategy(min_train_nodes=1), VideoStrategy(Median(), min_train_nodes=1)):
        strategy = private(inner, noise=1.0)
        configured(strategy, base, 3)
        new, _ = strategy.aggregate_train(
            1, [reply(i, moved(base, 0.1, seed=i), {"num-examples": 2}) for i in (1, 2, 3)]
        )
        assert new is not None
        settings = strategy.settings()
        assert settings["epsilon"] is None and settings["accounting"].startswith("not accounted")
    momentum = private(VideoStrategy(Average(), SGD(momentum=0.9), min_train_nodes=1), noise=1.0)
    assert "server-momentum" in momentum.settings()["accounting"]
    assert private(noise=1.0).settings()["accounting"].startswith("rdp")
    lossy = PrivateStrategy(VideoStrategy(Average()), "client-side", 1.0, 1.0, 1e-5, compression="int8")
    assert "compression='int8'" in lossy.settings()["accounting"] and lossy.settings()["epsilon"] is None


def test_an_unchanged_model_is_rejected_not_divided_by_zero():
    base = model()
    strategy = private(noise=1.0)
    configured(strategy, base, 2)
    # Only the integer counter moved: screening lets it through (not the global model), but the part
    # Flower's wrapper clips has norm 0.
    counter_only = {**base, "bn.num_batches_tracked": np.asarray(9, dtype=np.int64)}
    report = strategy.train_round(
        1, [reply(1, counter_only, {"num-examples": 1}), reply(2, moved(base, 0.1, seed=2), {"num-examples": 1})]
    )
    assert report.arrays is not None
    assert report.rejected == [{"node-id": 1, "reason": "update is the global model (norm 0)"}]


def test_a_free_rider_is_rejected_by_screening_before_the_wrapper():
    base = model()
    strategy = private(noise=1.0)
    configured(strategy, base, 2)
    replies = [reply(1, dict(base), {"num-examples": 1}), reply(2, moved(base, 0.1, seed=2), {"num-examples": 1})]
    report = strategy.train_round(1, replies)
    assert report.arrays is not None
    assert [r["node-id"] for r in report.rejected] == [1] and "free rider" in report.rejected[0]["reason"]


def test_client_side_mode_sends_the_clipping_norm_and_noises_the_mean():
    base = model()
    strategy = private(mode="client-side", noise=1.0, clip=0.7)
    messages = configured(strategy, base, 2)
    assert all(m.content["config"]["clipping_norm"] == 0.7 for m in messages)
    report = strategy.train_round(1, [reply(i, moved(base, 0.1, seed=i), {"num-examples": 2}) for i in (1, 2)])
    assert report.arrays is not None and report.privacy["clipped-updates"] is None


def test_the_inner_rules_report_survives_flowers_wrapper():
    """What the aggregation rule decided (here Krum's pick) reaches the round report through the DP
    wrapper, which itself passes on only Flower's types."""
    base = model()
    strategy = private(VideoStrategy(Krum(0), min_train_nodes=1), noise=0.0)
    configured(strategy, base, 3)
    report = strategy.train_round(1, [reply(i, moved(base, 0.1, seed=i), {"num-examples": 2}) for i in (1, 2, 3)])
    assert report.arrays is not None and report.fusion["selected-nodes"][0] in (1, 2, 3)
    assert report.privacy["clients-in-mean"] == 3


def test_state_carries_the_budget_spent_across_a_resume():
    strategy = private(noise=1.0)
    strategy.releases = 4
    again = private(noise=1.0)
    again.load_state(strategy.state())
    assert again.releases == 4 and again.settings()["epsilon"] == pytest.approx(epsilon_spent(1.0, 4, 1e-5))


def _train_message(arrays: dict[str, np.ndarray], clipping_norm: float | None) -> Message:
    msg = instruction(1, arrays)
    if clipping_norm is not None:
        msg.content["config"]["clipping_norm"] = clipping_norm
    return msg


def _node_app(update: dict[str, np.ndarray], seen: list):
    def app(msg: Message, context: Context) -> Message:
        seen.append(list(msg.content["arrays"].keys()))
        content = RecordDict({"arrays": numpy_to_arrays(update), "metrics": MetricRecord({"num-examples": 4})})
        return Message(content=content, reply_to=msg)

    return app


def test_client_mod_clips_floats_and_returns_the_whole_model_in_order():
    base = model()
    update = moved(base, 5.0, seed=3)
    seen: list = []
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    out = dp_clipping_mod(_train_message(base, 0.25), context, _node_app(update, seen))
    assert not out.has_error()
    assert seen == [list(base)]  # the app got the whole model, integer counters included
    result = arrays_to_numpy(out.content["arrays"])
    assert list(result) == list(base)
    assert update_norm(split_private(result)[0], split_private(base)[0]) == pytest.approx(0.25, rel=1e-4)
    assert result["bn.num_batches_tracked"] == update["bn.num_batches_tracked"]


def test_client_mod_clips_when_the_sent_record_is_in_another_order():
    """A global model read back from a checkpoint comes in name order, the client's reply in
    state_dict order: Flower's mod, which wants equal key lists, gets the sent floats in the reply's order."""
    base = model()
    update = moved(base, 5.0, seed=3)
    by_name = {k: base[k] for k in sorted(base)}
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    out = dp_clipping_mod(_train_message(by_name, 0.25), context, _node_app(update, []))
    assert not out.has_error()
    result = arrays_to_numpy(out.content["arrays"])
    assert list(result) == list(update)
    assert update_norm(split_private(result)[0], split_private(base)[0]) == pytest.approx(0.25, rel=1e-4)


def test_client_mod_passes_through_without_a_clipping_norm_and_for_evaluation():
    base = model()
    update = moved(base, 5.0, seed=3)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    for msg in (_train_message(base, None), instruction(1, base, message_type="evaluate")):
        out = dp_clipping_mod(msg, context, _node_app(update, []))
        result = arrays_to_numpy(out.content["arrays"])
        assert all(np.array_equal(result[k], update[k]) for k in update)


def test_dp_keys_are_validated_with_the_allowed_values():
    with pytest.raises(ConfigError, match='dp="local".*none, server-side, client-side'):
        parse_config({"dp": "local"}, check_paths=False)
    with pytest.raises(ConfigError, match="dp-clipping-norm=0.0"):
        parse_config({"dp": "server-side", "dp-clipping-norm": 0.0}, check_paths=False)
    with pytest.raises(ConfigError, match="dp-delta=1.0"):
        parse_config({"dp-delta": 1.0}, check_paths=False)


@pytest.mark.parametrize("mode", ["server-side", "client-side"])
def test_dp_run_completes_and_records_its_settings(mode, small_run_config, tmp_path):
    """The real round loop, ClientApp and mods (bench/inprocess.py) with DP on, 2 rounds."""
    config = {
        **small_run_config,
        "num-server-rounds": 2,
        "strategy": "average",
        "dp": mode,
        "dp-noise-multiplier": 0.5,
        "dp-clipping-norm": 2.0,
        "fraction-evaluate": 0.0,
    }
    results = run_inprocess(config, 3, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds-completed"] == 2
    privacy = summary["privacy"]
    assert privacy["mode"] == mode and privacy["noise-multiplier"] == 0.5 and privacy["clipping-norm"] == 2.0
    assert privacy["releases"] == 2 and privacy["epsilon"] == pytest.approx(epsilon_spent(0.5, 2, 1e-5))
    for record in results.rounds[1:]:
        assert record["privacy"]["clients-in-mean"] == 3
        assert record["privacy"]["noise-stdv"] == pytest.approx(0.5 * 2.0 / 3)
        if mode == "client-side":  # every update the server sees is already within the bound
            assert record["privacy"]["update-norm-median"] <= 2.0 + 1e-4
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert saved["dp"] == mode and saved["dp-clipping-norm"] == 2.0


def test_the_global_model_is_encoded_once_and_never_decoded_on_the_server(monkeypatch):
    """The round loop holds the model as numpy: configuring a round (through Flower's DP wrapper
    and the inner strategy) encodes it once for all messages and never decodes it back."""
    from flwr.app import Array

    from strategies.records import NamedArrays

    calls = {"encode": 0, "decode": 0}
    encode, decode = Array.from_numpy_ndarray.__func__, Array.numpy

    def counted_encode(cls, ndarray):
        calls["encode"] += 1
        return encode(cls, ndarray)

    def counted_decode(self):
        calls["decode"] += 1
        return decode(self)

    monkeypatch.setattr(Array, "from_numpy_ndarray", classmethod(counted_encode))
    monkeypatch.setattr(Array, "numpy", counted_decode)
    base = model()
    for strategy in (VideoStrategy(Average(), min_train_nodes=1, min_available_nodes=1), private(mode="client-side")):
        calls.update(encode=0, decode=0)
        ensure_identity()
        messages = strategy.configure_train_round(1, NamedArrays(numpy=base), StubGrid(3))
        assert len(messages) == 3 and all(list(m.content["arrays"]) == list(base) for m in messages)
        assert calls == {"encode": len(base), "decode": 0}

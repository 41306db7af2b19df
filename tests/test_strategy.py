import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

from strategies.aggregation import fedavg, weighted_average
from strategies.aggregators.feddf import FedDF
from strategies.aggregators.krum import Krum
from strategies.aggregators.median import Median
from strategies.records import arrays_to_numpy, numpy_to_arrays
from strategies.screening import readable_reason
from strategies.server_steps.sgd import SGD
from strategies.strategy import VideoStrategy, aggregate_metrics
from strategies.validation import reference_spec
from tests.flower_messages import ensure_identity, error_reply, reply


def model(rng, scale=1.0):
    return {
        "conv.weight": (scale * rng.normal(size=(4, 3, 3))).astype(np.float32),
        "bn.running_mean": rng.normal(size=(4,)).astype(np.float32),
        "bn.num_batches_tracked": np.array(int(rng.integers(1, 50)), dtype=np.int64),
    }


def with_reference(strategy, global_model):
    """``strategy`` checking replies against ``global_model``'s names, shapes and dtypes only (no
    global model to step from, or to compare free riders with)."""
    strategy.screener.reference = reference_spec(global_model)
    return strategy


def prepared_strategy(global_model):
    return with_reference(VideoStrategy(min_available_nodes=1, min_train_nodes=1), global_model)


def test_matches_flower_fedavg_on_valid_replies():
    rng = np.random.default_rng(0)
    clients = [model(rng) for _ in range(3)]
    counts = [5, 20, 11]
    replies = [
        reply(i + 1, m, {"num-examples": n, "train-loss": float(i)}) for i, (m, n) in enumerate(zip(clients, counts))
    ]
    ours, metrics = prepared_strategy(clients[0]).aggregate_train(1, replies)
    theirs, _ = FedAvg().aggregate_train(1, replies)
    ours, theirs = arrays_to_numpy(ours), arrays_to_numpy(theirs)
    for key in ("conv.weight", "bn.running_mean"):
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5)
    # Flower turns the integer buffer into a float mean; ours keeps the integer dtype, rounded.
    assert ours["bn.num_batches_tracked"].dtype == np.int64
    assert ours["bn.num_batches_tracked"] == np.rint(theirs["bn.num_batches_tracked"])
    assert metrics["num-examples"] == 36
    assert abs(metrics["train-loss"] - (0 * 5 + 1 * 20 + 2 * 11) / 36) < 1e-9


def test_bad_replies_are_dropped_counted_and_never_fatal():
    rng = np.random.default_rng(1)
    good = [model(rng) for _ in range(2)]
    nan_model = {**good[0], "conv.weight": np.full((4, 3, 3), np.nan, np.float32)}
    replies = [
        reply(1, good[0], {"num-examples": 10}),
        reply(2, good[1], {"num-examples": 30}),
        reply(3, {**good[0], "conv.weight": np.zeros((3, 3, 3), np.float32)}, {"num-examples": 10}),
        reply(4, nan_model, {"num-examples": 10}),
        reply(5, good[0], {"num-examples": 0}),
        reply(6, {k: v for k, v in good[0].items() if k != "bn.running_mean"}, {"num-examples": 10}),
        reply(7, None, {"num-examples": 10}),
        reply(8, good[0], {"num-examples": 10, "train-loss": float("inf")}),
        error_reply(9, "NoUsableVideoError: partition 2: no usable training video"),
    ]
    strategy = prepared_strategy(good[0])
    report = strategy.train_round(1, replies)
    arrays, metrics = report.arrays, report.metrics
    expected = fedavg([(good[0], 10), (good[1], 30)])
    np.testing.assert_allclose(arrays["conv.weight"], expected["conv.weight"], rtol=1e-6)
    assert [c.node_id for c in report.accepted] == [1, 2]
    reasons = {r["node-id"]: r["reason"] for r in report.rejected}
    assert set(reasons) == {3, 4, 5, 6, 7, 8}
    assert "shape" in reasons[3] and "non-finite" in reasons[4] and "num-examples" in reasons[5]
    assert "names" in reasons[6] and "ArrayRecord" in reasons[7] and "metrics" in reasons[8]
    assert report.failed[0]["node-id"] == 9 and "no usable training video" in report.failed[0]["reason"]
    assert metrics["num-examples"] == 40


def test_all_replies_bad_gives_no_update():
    rng = np.random.default_rng(2)
    strategy = prepared_strategy(model(rng))
    assert strategy.aggregate_train(1, [error_reply(1, "boom")]) == (None, None)  # Flower's types
    report = strategy.train_round(1, [error_reply(1, "boom")])
    assert report.arrays is None and report.metrics == {}
    assert "fewer than min-train-nodes=1" in report.skipped


def test_krum_adapts_f_to_the_replies_that_survived_screening():
    """Two NaN clients of six used to knock Krum (f = 1 needs 5 updates) out of every round; it now
    runs with the largest f the 4 survivors allow, and says so."""
    rng = np.random.default_rng(5)
    models = [model(rng) for _ in range(6)]
    nan_model = {**models[0], "conv.weight": np.full((4, 3, 3), np.nan, np.float32)}
    replies = [reply(i + 1, m, {"num-examples": 4}) for i, m in enumerate(models)]
    replies[0], replies[1] = reply(1, nan_model, {"num-examples": 4}), error_reply(2, "node vanished", code=5)
    strategy = with_reference(VideoStrategy(Krum(1), min_train_nodes=4), models[0])
    report = strategy.train_round(1, replies)
    assert report.arrays is not None and report.fusion["krum-malicious"] == 0
    assert report.fusion["selected-nodes"][0] in (3, 4, 5, 6)
    strategy.min_train_nodes = 5  # fewer survivors than the user requires: the global model is kept
    report = strategy.train_round(1, replies)
    assert report.arrays is None and "4 usable updates, fewer than min-train-nodes=5" in report.skipped
    strategy.min_train_nodes = 1  # 2 updates: too few for any Krum
    report = strategy.train_round(1, replies[:3])
    assert report.arrays is None and "aggregation failed" in report.skipped and "at least 3" in report.skipped


def test_configure_train_records_the_reference_model():
    rng = np.random.default_rng(3)
    global_model = model(rng)

    class OneNodeGrid:
        def get_node_ids(self):
            return [42]

    strategy = VideoStrategy(min_available_nodes=1, min_train_nodes=1)
    messages = list(strategy.configure_train(1, numpy_to_arrays(global_model), ConfigRecord(), OneNodeGrid()))
    assert [m.metadata.dst_node_id for m in messages] == [42]
    assert strategy.screener.reference["conv.weight"] == ((4, 3, 3), np.dtype(np.float32))


def test_evaluate_aggregation_weights_by_examples_and_sums_counts():
    replies = [
        reply(1, None, {"num-examples": 10, "loss": 1.0, "video-accuracy": 0.5, "skipped-videos": 1}),
        reply(2, None, {"num-examples": 30, "loss": 2.0, "video-accuracy": 1.0, "skipped-videos": 2}),
        reply(3, None, {"num-examples": -1, "loss": 2.0}),
    ]
    strategy = VideoStrategy()
    report = strategy.evaluate_round(1, replies)
    metrics = report.metrics
    assert abs(metrics["loss"] - 1.75) < 1e-9 and abs(metrics["video-accuracy"] - 0.875) < 1e-9
    assert metrics["skipped-videos"] == 3
    assert [r["node-id"] for r in report.rejected] == [3]
    assert dict(strategy.aggregate_evaluate(1, replies)) == metrics  # Flower's interface, same figures


def test_metric_lists_are_kept_per_client_not_averaged():
    from strategies.strategy import ClientReply

    out = aggregate_metrics([ClientReply(1, {"num-examples": 2, "class-counts": [1, 1], "partition-id": 3})])
    assert "class-counts" not in out and "partition-id" not in out and out["num-examples"] == 2


def _replies(models, counts, extra=None):
    return [
        reply(i + 1, m, {"num-examples": n, "train-loss": 0.1 * (i + 1), **(extra or {})})
        for i, (m, n) in enumerate(zip(models, counts))
    ]


def test_each_family_calls_its_aggregation_function():
    from strategies.aggregation import average
    from strategies.aggregators.average import Average
    from strategies.aggregators.geometric_median import GeometricMedian
    from strategies.aggregators.trimmed_mean import TrimmedMean
    from strategies.aggregators.weighted import Weighted
    from strategies.coordinatewise import coordinate_median, trimmed_mean
    from strategies.fusion import geometric_median, krum
    from strategies.weighting import client_weights

    rng = np.random.default_rng(7)
    models = [model(rng) for _ in range(6)]
    counts = [3, 5, 8, 13, 21, 34]
    replies = _replies(models, counts)
    metrics = [dict(r.content["metrics"]) for r in replies]

    def run(strategy):
        arrays, _ = with_reference(strategy, models[0]).aggregate_train(1, replies)
        return arrays_to_numpy(arrays)

    weights = client_weights("inverse-loss", metrics)
    expected = {
        "average": (VideoStrategy(Average()), average(models)),
        "weighted": (VideoStrategy(Weighted("inverse-loss")), weighted_average(zip(models, weights))),
        "median": (VideoStrategy(Median()), coordinate_median(models)),
        "trimmed-mean": (VideoStrategy(TrimmedMean(0.2)), trimmed_mean(models, 0.2)),
        "geometric-median": (VideoStrategy(GeometricMedian()), geometric_median(models, counts)[0]),
        "krum": (VideoStrategy(Krum(1)), krum(models, 1)[0]),
    }
    for name, (strategy, want) in expected.items():
        got = run(strategy)
        for key in want:
            if strategy.streams():  # folded as replies arrive: the held mean to float32 rounding
                np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6, err_msg=name)
            else:
                np.testing.assert_array_equal(got[key], want[key], err_msg=name)


def _lazy_replies(n, size, seed=0):
    """n replies of a model with one ``size``-float tensor, built one at a time as they are read."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        weights = {"w": rng.normal(size=size).astype(np.float32), "n": np.array(i, np.int64)}
        yield reply(i + 1, weights, {"num-examples": 10 + i})


def _peak_bytes(strategy, n, size):
    import tracemalloc

    strategy.screener.reference = {"w": ((size,), np.dtype(np.float32)), "n": ((), np.dtype(np.int64))}
    replies = _lazy_replies(n, size)
    tracemalloc.start()
    try:
        report = strategy.train_round(1, replies)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(report.accepted) == n and report.arrays is not None
    return peak, report


def test_fedavg_folds_replies_as_they_arrive_in_memory_that_does_not_grow_with_n():
    # The outcome: the server's memory for a round of 40 replies is that of 4: the two running
    # sums, the replies in flight (message and decoded arrays) and this test's own generator
    # (a float64 draw and its float32 copy), about 7 models; holding every update instead grows
    # by two models (message and decoded arrays) per reply.
    size = 1 << 18  # 1 MiB of float32 per model
    model_bytes = size * 4
    few, report = _peak_bytes(VideoStrategy(min_train_nodes=1), 4, size)
    many, report = _peak_bytes(VideoStrategy(min_train_nodes=1), 40, size)
    assert report.fusion["streamed-replies"] == 40
    assert all(r.arrays is None and r.message is None for r in report.accepted)  # nothing kept
    assert many < few + model_bytes and many < 8 * model_bytes
    held, _ = _peak_bytes(VideoStrategy(Median(), min_train_nodes=1), 40, size)
    assert held > 40 * model_bytes  # a rule of all N updates holds them (README, Performance)
    # And the folded mean is the held one.
    want = fedavg(
        (m, 10 + i) for i, m in enumerate(arrays_to_numpy(r.content["arrays"]) for r in _lazy_replies(40, size))
    )
    np.testing.assert_allclose(report.arrays["w"], want["w"], rtol=1e-6, atol=1e-7)


def test_feddf_starts_from_the_weighted_average_and_uses_the_distiller():
    from fedapp.server.build_strategy import build_strategy
    from fedapp.task.config import parse_config

    rng = np.random.default_rng(8)
    models = [model(rng) for _ in range(3)]
    counts = [1, 2, 3]
    seen = {}

    def distiller(start, client_models, weights):
        seen.update(start=start, n=len(client_models), weights=weights)
        return start, {"steps": 0}

    strategy = with_reference(VideoStrategy(FedDF(distiller)), models[0])
    report = strategy.train_round(1, _replies(models, counts))
    np.testing.assert_array_equal(seen["start"]["conv.weight"], fedavg(zip(models, counts))["conv.weight"])
    assert seen["n"] == 3 and seen["weights"] == [1.0, 2.0, 3.0]
    assert report.fusion == {"steps": 0}
    # A config that selects FedDF is refused by a server that has no distiller to hand it.
    feddf = parse_config({"strategy": "fusion", "fusion-fn": "feddf"}, check_paths=False)
    with pytest.raises(ValueError, match="distiller"):
        build_strategy(feddf)


def test_server_momentum_matches_flower_fedavgm():
    from flwr.serverapp.strategy import FedAvgM

    from strategies.server_optimizer import RUNNING_STATS

    rng = np.random.default_rng(9)
    start = model(rng)
    float_keys = [k for k, v in start.items() if np.issubdtype(v.dtype, np.floating)]
    start = {k: start[k] for k in float_keys}

    class Grid:
        def get_node_ids(self):
            return [1, 2]

    ours = VideoStrategy(server_step=SGD(lr=0.7, momentum=0.9), min_available_nodes=2)
    theirs = FedAvgM(server_learning_rate=0.7, server_momentum=0.9, min_available_nodes=2)
    current_ours = current_theirs = numpy_to_arrays(start)
    for server_round in (1, 2, 3):
        clients = [{k: v + rng.normal(size=v.shape).astype(v.dtype) for k, v in start.items()} for _ in range(2)]
        replies = _replies(clients, [4, 6])
        list(ours.configure_train(server_round, current_ours, ConfigRecord(), Grid()))
        list(theirs.configure_train(server_round, current_theirs, ConfigRecord(), Grid()))
        current_ours, _ = ours.aggregate_train(server_round, replies)
        current_theirs, _ = theirs.aggregate_train(server_round, replies)
        a, b = arrays_to_numpy(current_ours), arrays_to_numpy(current_theirs)
        for key in float_keys:
            if key.endswith(RUNNING_STATS):  # statistics, not parameters: the plain weighted mean
                mean = (4 * clients[0][key].astype(np.float64) + 6 * clients[1][key]) / 10
                np.testing.assert_allclose(a[key], mean, rtol=1e-5, atol=1e-6)
            else:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
        # What differs from Flower's FedAvgM, which steps the running statistics too:
        assert any(k.endswith(RUNNING_STATS) for k in float_keys)


def test_proximal_mu_is_sent_to_clients():
    class Grid:
        def get_node_ids(self):
            return [1]

    strategy = VideoStrategy(proximal_mu=0.01, min_available_nodes=1, min_train_nodes=1)
    rng = np.random.default_rng(10)
    (message,) = strategy.configure_train(1, numpy_to_arrays(model(rng)), ConfigRecord(), Grid())
    assert message.content["config"]["proximal-mu"] == 0.01


def test_error_written_by_the_superlink_is_attributed_to_the_node_that_vanished():
    class Grid:
        def get_node_ids(self):
            return [11, 22]

    rng = np.random.default_rng(11)
    global_model = model(rng)
    ensure_identity()
    strategy = VideoStrategy(min_available_nodes=2, min_train_nodes=1)
    sent = list(strategy.configure_train(1, numpy_to_arrays(global_model), ConfigRecord(), Grid()))
    for message in sent:  # what the grid does when it pushes them (sampling order is random)
        message.metadata.__dict__["_message_id"] = f"id-{message.metadata.dst_node_id}"
    vanished = error_reply(0, "node failed to report a heartbeat", code=5)
    vanished.metadata.__dict__["_reply_to_message_id"] = "id-22"
    vanished.metadata.__dict__["_src_node_id"] = 1  # the SuperLink
    ok = reply(11, global_model, {"num-examples": 3})
    report = strategy.train_round(1, [ok, vanished])
    assert [f["node-id"] for f in report.failed] == [22]


def test_a_reply_that_is_the_global_model_is_rejected_as_a_free_rider():
    """A zero update trained nothing: accepted, it would shrink FedAvg's step and, sent by several
    idle or colluding nodes, form the tight cluster a median or geometric median picks."""
    rng = np.random.default_rng(7)
    global_model = model(rng)
    honest = [model(rng) for _ in range(2)]
    one_changed = {**global_model, "conv.weight": global_model["conv.weight"] + np.float32(1e-3)}
    replies = [
        reply(1, honest[0], {"num-examples": 10}),
        reply(2, honest[1], {"num-examples": 30}),
        reply(3, {k: v.copy() for k, v in global_model.items()}, {"num-examples": 50}),
        reply(4, one_changed, {"num-examples": 10}),
    ]
    strategy = prepared_strategy(global_model)
    strategy.set_global(global_model)
    report = strategy.train_round(1, replies)
    assert [r["node-id"] for r in report.rejected] == [3]
    assert "identical to the global model" in report.rejected[0]["reason"]
    assert [c.node_id for c in report.accepted] == [1, 2, 4]
    expected = fedavg([(honest[0], 10), (honest[1], 30), (one_changed, 10)])
    np.testing.assert_allclose(report.arrays["conv.weight"], expected["conv.weight"], rtol=1e-6)


# What the simulation engine stores for a ClientApp that raised (Flower 1.42 + Ray, as captured):
# Flower's "<class ...>:<'...'>" around Ray's colour-coded traceback of the client's own exception.
RAY_REASON = (
    "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException occurred. Message: "
    "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=4181, ip=10.0.0.4, actor_id=9f2e)\n"
    '  File "/venv/flwr/simulation/ray_transport/ray_actor.py", line 60, in run\n'
    "    out_message = app(message=message, context=context)\n"
    '  File "/app/fedapp/client/video_client.py", line 172, in fit\n'
    "    raise NoUsableVideoError(\n"
    "\x1b[31mfedapp.client.video_client.NoUsableVideoError\x1b[0m: partition 3: no usable training video "
    "(2 skipped as unreadable)'>"
)


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        (
            2,
            RAY_REASON,
            "error code 2: NoUsableVideoError: partition 3: no usable training video (2 skipped as unreadable)",
        ),
        (
            2,
            "<class 'fedapp.client.video_client.NoUsableVideoError'>:<'partition 1: every training clip failed'>",
            "error code 2: NoUsableVideoError: partition 1: every training clip failed",
        ),
        (
            5,
            "Error: Message Unavailable - The requested message could not be found.",
            "error code 5: Error: Message Unavailable - The requested message could not be found.",
        ),  # fmt: skip
        (0, "", "error code 0"),
    ],
)
def test_a_failed_clients_reason_is_stored_as_one_readable_line(code, text, expected):
    reason = readable_reason(code, text)
    assert reason == expected
    assert "\n" not in reason and "\x1b" not in reason


def test_a_long_reason_is_cut_to_one_short_line():
    reason = readable_reason(2, "<class 'ValueError'>:<'" + "x" * 5000 + "'>")
    assert len(reason) == 300 and reason.startswith("error code 2: ValueError: xxx") and reason.endswith("...")

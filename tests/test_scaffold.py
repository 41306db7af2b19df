"""SCAFFOLD (strategies/scaffold.py, option II): the control-variate math on a hand-made quadratic
problem, the formulas, and the strategy's message and state handling."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.records import NamedArrays, arrays_to_numpy, numpy_to_arrays
from strategies.scaffold import CONTROL, CONTROL_DELTA, Scaffold, client_control, server_control, zero_control
from strategies.strategy import VideoStrategy
from tests.flower_messages import ensure_identity, reply

# Four clients, f_i(x) = ½ (x − b_i)ᵀ diag(a_i) (x − b_i): heterogeneous curvatures and optima.
A = np.array([[1.0, 0.2, 1.5], [0.3, 1.8, 0.5], [1.2, 1.0, 0.1], [0.6, 0.4, 1.9]])
B = np.array([[2.0, -1.0, 0.5], [-3.0, 2.0, 1.0], [0.5, 0.5, -2.0], [1.0, -2.0, 3.0]])
OPTIMUM = (A * B).sum(0) / A.sum(0)  # the minimiser of Σ f_i
LR, STEPS = 0.1, 10


def local_sgd(i: int, x: np.ndarray, correction: np.ndarray) -> np.ndarray:
    y = x.copy()
    for _ in range(STEPS):
        y = y - LR * (A[i] * (y - B[i]) + correction)
    return y


def run(scaffold: bool, rounds: int = 300) -> np.ndarray:
    x = np.zeros(3)
    c = {"x": np.zeros(3, np.float32)}
    c_i = [{} for _ in A]
    for _ in range(rounds):
        trained, deltas = [], []
        for i in range(len(A)):
            correction = (c["x"] - c_i[i].get("x", 0.0)) if scaffold else np.zeros(3)
            y = local_sgd(i, x, correction)
            trained.append(y)
            if scaffold:
                c_i[i], delta = client_control(c_i[i], c, {"x": x}, {"x": y}, STEPS, LR)
                deltas.append(delta)
        x = np.mean(trained, axis=0)
        if scaffold:
            c = server_control(c, deltas, len(A))
    return x


def test_scaffold_converges_on_a_quadratic_where_fedavg_drifts():
    fedavg, scaffold = run(scaffold=False), run(scaffold=True)
    assert np.linalg.norm(fedavg - OPTIMUM) > 0.1  # client drift: FedAvg's fixed point is elsewhere
    assert np.linalg.norm(scaffold - OPTIMUM) < 1e-4


def test_client_control_is_option_ii():
    local = {"w": np.array([0.5, -1.0], np.float32)}
    server = {"w": np.array([0.25, 0.25], np.float32)}
    start, trained = {"w": np.array([1.0, 2.0])}, {"w": np.array([0.4, 2.6])}
    new, delta = client_control(local, server, start, trained, steps=3, lr=0.2)
    expected = local["w"] - server["w"] + (start["w"] - trained["w"]) / (3 * 0.2)
    np.testing.assert_allclose(new["w"], expected, rtol=1e-6)
    np.testing.assert_allclose(delta["w"], expected - local["w"], rtol=1e-6)
    first, _ = client_control({}, server, start, trained, steps=3, lr=0.2)  # cᵢ starts at zero
    np.testing.assert_allclose(first["w"], -server["w"] + (start["w"] - trained["w"]) / 0.6, rtol=1e-6)
    with pytest.raises(ValueError, match="steps >= 1"):
        client_control(local, server, start, trained, steps=0, lr=0.2)


def test_server_control_adds_the_deltas_over_all_clients():
    c = {"w": np.ones(2, np.float32)}
    deltas = [{"w": np.array([1.0, 3.0], np.float32)}, {"w": np.array([3.0, -1.0], np.float32)}]
    # |S| / N · mean = Σ Δ / N with 2 of 4 clients replying
    np.testing.assert_allclose(server_control(c, deltas, 4)["w"], [2.0, 1.5])
    np.testing.assert_allclose(server_control(c, [], 4)["w"], c["w"])


def test_zero_control_covers_learnable_tensors_only():
    model = {
        "conv.weight": np.ones((2, 2), np.float32),
        "bn.running_var": np.ones(2, np.float32),
        "bn.num_batches_tracked": np.array(3, np.int64),
    }
    assert set(zero_control(model)) == {"conv.weight"}


class Grid:
    def get_node_ids(self):
        return [1, 2, 3, 4]


def global_model():
    return {
        "conv.weight": np.ones((2, 3), np.float32),
        "bn.running_var": np.ones(3, np.float32),
        "bn.num_batches_tracked": np.array(5, np.int64),
    }


def scaffold_reply(node_id, model, delta, n=10):
    message = reply(node_id, model, {"num-examples": n})
    if delta is not None:
        message.content[CONTROL_DELTA] = numpy_to_arrays(delta)
    return message


def test_the_strategy_sends_the_control_and_updates_it_from_the_replies():
    ensure_identity()
    strategy = VideoStrategy(scaffold=Scaffold(), min_available_nodes=1, min_train_nodes=1, fraction_train=0.5)
    sent = strategy.configure_train_round(1, NamedArrays(numpy=global_model()), Grid())
    assert len(sent) == 2 and all(CONTROL in m.content.array_records for m in sent)
    assert set(arrays_to_numpy(sent[0].content[CONTROL])) == {"conv.weight"}
    assert strategy.extra_bytes_down() == 6 * 4
    trained = {**global_model(), "conv.weight": np.full((2, 3), 0.5, np.float32)}
    d1, d2 = {"conv.weight": np.full((2, 3), 2.0, np.float32)}, {"conv.weight": np.full((2, 3), 6.0, np.float32)}
    report = strategy.train_round(
        1,
        [
            scaffold_reply(1, trained, d1),
            scaffold_reply(2, trained, d2),
            scaffold_reply(3, trained, None),  # no Δc: rejected, not aggregated as a zero
            scaffold_reply(4, trained, {"conv.weight": np.full((2, 3), np.nan, np.float32)}),
        ],
    )
    assert [c.node_id for c in report.accepted] == [1, 2]
    reasons = {r["node-id"]: r["reason"] for r in report.rejected}
    assert "carries no 'scaffold-delta'" in reasons[3] and "non-finite" in reasons[4]
    # c = 0 + (2 + 6) / N with N = 4 nodes: 2.0
    np.testing.assert_allclose(strategy.scaffold.control["conv.weight"], 2.0)
    assert report.fusion["scaffold"]["clients"] == 2
    assert report.bytes_received == 2 * (trained["conv.weight"].nbytes + 12 + 8 + 24)
    restored = VideoStrategy(scaffold=Scaffold())
    restored.load_state(strategy.state())
    np.testing.assert_array_equal(restored.scaffold.control["conv.weight"], strategy.scaffold.control["conv.weight"])

"""SCAFFOLD's control variates (Karimireddy et al., ICML 2020, Algorithm 1, option II) as plain numpy.

Under non-IID data each client's local steps drift towards its own optimum; SCAFFOLD corrects every
local gradient by ``c − cᵢ`` (server control minus the client's), estimates of the federation's and
the client's gradient. After K local SGD steps of rate η from the global model x to y:

    cᵢ⁺ = cᵢ − c + (x − y) / (K η)             (option II: no extra pass over the data)
    Δcᵢ = cᵢ⁺ − cᵢ                             (sent with the model)
    c   ← c + (|S| / N) · mean_{i ∈ S} Δcᵢ     (S: the clients that replied, N: all clients)

The model itself is aggregated by the strategy's family (FedAvg, uniform or weighted mean) and
server optimizer. Control variates cover the learnable tensors (floating, not BatchNorm buffers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Message

from fedapp.config.keys import Key, toml
from strategies.records import numpy_to_arrays
from strategies.server_optimizer import is_learnable
from strategies.stage import Stage
from strategies.validation import reference_spec

Weights = dict[str, np.ndarray]
CONTROL = "scaffold-control"  # record key of the server's control variate in a train message
CONTROL_DELTA = "scaffold-delta"  # record key of a client's Δcᵢ in its train reply


def zero_control(model: Mapping[str, np.ndarray]) -> Weights:
    """The initial control variate: zeros over the model's learnable tensors (float32)."""
    return {k: np.zeros(np.shape(v), np.float32) for k, v in model.items() if is_learnable(k, np.asarray(v))}


def client_control(
    local: Mapping[str, np.ndarray],
    server: Mapping[str, np.ndarray],
    start: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    steps: int,
    lr: float,
) -> tuple[Weights, Weights]:
    """Option II: ``(cᵢ⁺, Δcᵢ)`` from the client's and the server's control variates and the
    displacement of ``steps`` SGD steps of rate ``lr``; a key missing from ``local`` starts at 0."""
    if steps < 1 or lr <= 0:
        raise ValueError(f"SCAFFOLD needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    new: Weights = {}
    delta: Weights = {}
    for key, c in server.items():
        c_i = np.asarray(local.get(key, np.zeros_like(c)), np.float64)
        drift = (np.asarray(start[key], np.float64) - np.asarray(trained[key], np.float64)) / (steps * lr)
        updated = c_i - np.asarray(c, np.float64) + drift
        new[key] = updated.astype(np.float32)
        delta[key] = (updated - c_i).astype(np.float32)
    return new, delta


def server_control(
    control: Mapping[str, np.ndarray], deltas: Sequence[Mapping[str, np.ndarray]], num_clients: int
) -> Weights:
    """``c + (|S| / N) · mean Δcᵢ``: the server control after a round in which ``len(deltas)`` of
    ``num_clients`` clients replied (equal to ``c + Σ Δcᵢ / N``)."""
    if not deltas:
        return {k: np.asarray(v) for k, v in control.items()}
    if num_clients < len(deltas):
        raise ValueError(f"{len(deltas)} replies from {num_clients} clients")
    return {
        k: (np.asarray(c, np.float64) + sum(np.asarray(d[k], np.float64) for d in deltas) / num_clients).astype(
            np.float32
        )
        for k, c in control.items()
    }


class Scaffold(Stage):
    """The server side of SCAFFOLD: sends c with the model, reads each reply's Δcᵢ, updates c.

    Its key ``scaffold`` is its own switch; the model itself is still merged by the aggregator and
    the server step."""

    kind = "control-variates"
    name = "scaffold"
    keys = (Key("scaffold", False, "SCAFFOLD control variates (option II) with the averaging family"),)

    def __init__(self) -> None:
        self.control: Weights | None = None  # c, None until the first round
        self.num_nodes = 0  # the clients there are (N), counted when a round is configured

    @classmethod
    def selected(cls, cfg: Any) -> bool:
        return True

    @classmethod
    def checks(cls, cfg: Any) -> list[str]:
        """Option II reads each client's average gradient from its plain-SGD displacement and sends
        a second record beside the model: refuse what would make either wrong or silently off."""
        if not cfg.scaffold:
            return []
        problems = []
        if cfg.optimizer != "sgd" or cfg.momentum != 0.0:
            problems.append(
                f'optimizer={toml(cfg.optimizer)} momentum={toml(cfg.momentum)}: set optimizer="sgd" momentum=0.0 '
                "(option II derives the control variate from plain SGD steps)"
            )
        if cfg.strategy == "fusion":
            problems.append('strategy="fusion": use "fedavg", "average" or "weighted" (the averaging family)')
        if cfg.dp != "none":
            problems.append(f'dp={toml(cfg.dp)}: set dp="none" (the control variates are not clipped or noised)')
        if cfg.compression != "none":
            problems.append(f'compression={toml(cfg.compression)}: set compression="none"')
        if cfg.client_momentum > 0:
            problems.append(f"client-momentum={cfg.client_momentum!r}: set client-momentum=0.0")
        return ["scaffold=true does not work with " + "; ".join(problems)] if problems else []

    def attach(self, messages: Sequence[Message], current: Mapping[str, np.ndarray], num_nodes: int) -> None:
        """Put c into each train message (zeros in the first round)."""
        if self.control is None:
            self.control = zero_control(current)
        self.num_nodes = max(num_nodes, len(messages))
        record = numpy_to_arrays(self.control)
        for message in messages:
            message.content[CONTROL] = record

    def reference(self, current: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """What each Δcᵢ must look like: c's names, shapes and dtypes."""
        return reference_spec(self.control or zero_control(current))

    def update(self, deltas: list[Weights], current: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """c ← c + Σ Δcᵢ / N; what it did, for the round record."""
        self.control = server_control(self.control or zero_control(current), deltas, self.num_nodes)
        norm = float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in self.control.values())))
        return {"scaffold": {"control-norm": norm, "clients": len(deltas)}}

    def extra_bytes(self) -> int:
        """Bytes each train message carries beside the model."""
        return sum(v.nbytes for v in self.control.values()) if self.control else 0

    def state(self) -> dict[str, Any]:
        return {"scaffold-control": self.control}

    def load_state(self, state: dict[str, Any]) -> None:
        control = state.get("scaffold-control")
        self.control = {k: np.asarray(x) for k, x in control.items()} if control else None

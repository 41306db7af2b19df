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

import numpy as np

from strategies.server_optimizer import is_learnable

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

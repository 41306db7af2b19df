"""TEST TOOL: simulated malicious clients, for robustness experiments only.

With ``attack`` != "none" in the run config, the first ``round(attack-fraction × num-partitions)``
partitions misbehave. Nothing here belongs in a production federation; it exists so the robust
fusion strategies can be measured against known attacks (``bench/compare_strategies.py``).

- ``sign-flip``: send ``start − scale · (trained − start)``: the honest update reversed and amplified.
- ``noise``: send ``start + N(0, (scale · std of the honest update)²)`` per tensor: garbage of a
  plausible size.
- ``label-flip``: train honestly on poisoned labels ``y → C − 1 − y`` (data poisoning).
- ``free-rider``: skip training and send the global model back unchanged (a zero update) while
  claiming its sample count. Reply screening rejects it (``strategies.validation.is_unchanged``);
  a disguised free rider adding noise would pass, which is the ``noise`` attack at a small scale.
- ``alie``, ``ipm``, ``min-max``, ``min-sum``: omniscient colluding attacks. They need the round's
  honest updates, which no client here can see: the attacker trains honestly and marks its reply
  (metric ``attacker: 1``), and the server-side test tool (``strategies.attacks``) puts the
  attack in its place before aggregation. That simulates the papers' threat model (full knowledge),
  not something a real attacker in this system can do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from strategies.attacks import ATTACKER_METRIC, OMNISCIENT_ATTACKS

if TYPE_CHECKING:  # the run config imports ATTACKS: validating it must not wait for torch
    import torch

ATTACKS = ("none", "sign-flip", "noise", "label-flip", "free-rider", *OMNISCIENT_ATTACKS)
UPDATE_ATTACKS = ("sign-flip", "noise")  # the ones poison_update computes on the client


def attacker_metrics(attack: str) -> dict[str, int]:
    """The mark an omniscient attacker adds to its reply, for the server-side step to find it."""
    return {ATTACKER_METRIC: 1} if attack in OMNISCIENT_ATTACKS else {}


def is_attacker(partition_id: int, num_partitions: int, fraction: float) -> bool:
    """Whether this partition plays the attacker (the first ``round(fraction × n)`` ones)."""
    return partition_id < round(fraction * num_partitions)


def flipped_labels(num_classes: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The label-flip poisoning ``y → C − 1 − y``."""
    return lambda labels: (num_classes - 1) - labels


def poison_update(
    start: Sequence[np.ndarray],
    trained: Sequence[np.ndarray],
    attack: str,
    scale: float,
    rng: np.random.Generator,
    poison: Sequence[bool] | None = None,
) -> list[np.ndarray]:
    """The model an attacker sends instead of ``trained``.

    ``poison`` marks the tensors to tamper with (default: all floating ones). The client passes
    its learnable parameters only: a sign-flipped BatchNorm running variance is negative, which
    reply validation rejects outright; the attacker modelled here is one that passes validation.
    """
    poison = poison if poison is not None else [True] * len(trained)
    out = []
    for s, t, tamper in zip(start, trained, poison):
        if not tamper or not np.issubdtype(t.dtype, np.floating):
            out.append(t)
            continue
        delta = t.astype(np.float64) - s.astype(np.float64)
        if attack == "sign-flip":
            poisoned = s - scale * delta
        elif attack == "noise":
            poisoned = s + rng.normal(0.0, scale * (delta.std() + 1e-8), size=s.shape)
        else:
            raise ValueError(f"poison_update: attack {attack!r} does not poison updates")
        out.append(np.asarray(poisoned, dtype=t.dtype))
    return out

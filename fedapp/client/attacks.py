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
from typing import TYPE_CHECKING, Any

import numpy as np

from fedapp.config.keys import Key, Owner
from strategies.attacks import ATTACKER_METRIC, OMNISCIENT_ATTACKS

if TYPE_CHECKING:  # the run config imports ATTACKS: validating it must not wait for torch
    import torch

ATTACKS = ("none", "sign-flip", "noise", "label-flip", "free-rider", *OMNISCIENT_ATTACKS)
UPDATE_ATTACKS = ("sign-flip", "noise")  # the ones poison_update computes on the client


def _attacking(cfg: Any) -> bool:
    return cfg.attack != "none"


def _not_with_dp(cfg: Any) -> list[str]:
    if cfg.attack in OMNISCIENT_ATTACKS and cfg.dp != "none":
        # Server-side DP clips inside Flower's wrapper before the inner strategy (where the test
        # tool injects) aggregates: the forged model would skip the clipping real replies get.
        return [f'attack={cfg.attack!r} is not simulated with dp={cfg.dp!r}: set dp="none"']
    return []


# TEST TOOL keys (robustness experiments only).
KEYS = Owner(
    "the attack test tool",
    keys=(
        Key("attack", "none", "TEST TOOL: the attack simulated clients mount", choices=ATTACKS,
            when=lambda c: c.attack_fraction > 0, needs="attack-fraction > 0 (the share of clients that attack)"),
        Key("attack-fraction", 0.0, "TEST TOOL: share of clients that attack", low=0.0, high=1.0, when=_attacking,
            needs='attack != "none"'),
        Key("attack-scale", 10.0, "TEST TOOL: sign-flip / noise magnitude", low=0.0,
            when=lambda c: c.attack in UPDATE_ATTACKS, needs='attack="sign-flip" or "noise"'),
        Key("attack-z", 0.0, "TEST TOOL: ALIE's z (0: the paper's z_max)", low=0.0,
            when=lambda c: c.attack == "alie", needs='attack="alie"'),
        Key("attack-epsilon", 0.1, "TEST TOOL: IPM's epsilon", low=0.0, low_open=True,
            when=lambda c: c.attack == "ipm", needs='attack="ipm"'),
    ),
    checks=(_not_with_dp,),
)  # fmt: skip


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

"""TEST TOOL: omniscient, colluding model-poisoning attacks, simulated on the server side.

The strong attacks of the robust-aggregation literature (ALIE, IPM, min-max / min-sum) are
computed from the *honest clients' updates of the round*: their threat model grants the attacker
full knowledge of them and lets all attackers collude. A client of this system never sees another
client's update, so no real attacker here could mount them. To measure robust rules against them
anyway, the test tool simulates that knowledge on the server: attacker clients train honestly and
mark their reply (metric ``attacker: 1``); :class:`ColludingAttack`, a transform outside the
registry (``fedapp.server.build_strategy.colluding_attack`` adds it only for the test tool's
``attack`` keys), runs first on the screened updates and replaces every marked reply's model by
one malicious model computed from the other replies' deltas. All attackers send that same model, as in the papers.

Attacks act on deltas (model − global model) over learnable parameters only (``is_parameter``):
with ``client-momentum`` the honest replies carry momenta, so the attack is computed from those;
BatchNorm statistics and counters stay the attacker's honest ones (a forged running variance
could be negative, which validation rejects; the attacker modelled here passes validation).

Standard deviations are per coordinate and unbiased (ddof=1), as in the authors' reference code
(``torch.std``); with a single honest update the spread is 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

from strategies.fusion import is_parameter
from strategies.stage import RoundContext, Transform, Update

OMNISCIENT_ATTACKS = ("alie", "ipm", "min-max", "min-sum")
ATTACKER_METRIC = "attacker"  # the reply metric that marks a simulated attacker (test tool only)
MIN_MAX_GAMMA_INIT = 10.0  # Shejwalkar & Houmansadr's initial γ and stopping threshold
MIN_MAX_THRESHOLD = 1e-5


def alie_z_max(n: int, f: int) -> float:
    """ALIE's z_max (Baruch et al. 2019): ``s = floor(n/2 + 1) − f``, ``z = Φ⁻¹((n − s)/n)``.

    ``s`` is how many honest clients the attackers must win over for a majority; when the ``f``
    attackers already are one (s ≤ 0) the formula is undefined and s = 1 (its largest z) is used."""
    s = max(math.floor(n / 2 + 1) - f, 1)
    return NormalDist().inv_cdf((n - s) / n)


def _spread(honest: np.ndarray) -> np.ndarray:
    return honest.std(axis=0, ddof=1) if len(honest) > 1 else np.zeros(honest.shape[1])


def alie(honest: np.ndarray, z: float) -> np.ndarray:
    """``μ − z·σ`` per coordinate of the honest updates (rows of ``honest``)."""
    return honest.mean(axis=0) - z * _spread(honest)


def ipm(honest: np.ndarray, epsilon: float) -> np.ndarray:
    """Inner-product manipulation (Xie, Koyejo & Gupta 2020): ``−ε · mean(honest)``."""
    return -epsilon * honest.mean(axis=0)


def _sq_distances(points: np.ndarray, to: np.ndarray) -> np.ndarray:
    return np.sum((points - to) ** 2, axis=1)


def min_max_or_sum(
    honest: np.ndarray, objective: str, gamma_init: float = MIN_MAX_GAMMA_INIT, threshold: float = MIN_MAX_THRESHOLD
) -> tuple[np.ndarray, float]:
    """Shejwalkar & Houmansadr (NDSS 2021), AGR-agnostic: ``μ + γ·p`` with ``p = −std`` ("inverse
    std"), γ the largest value the halving search finds such that

    - ``min-max``: ``max_i ‖m − h_i‖² ≤ max_{i,j} ‖h_i − h_j‖²``;
    - ``min-sum``: ``Σ_i ‖m − h_i‖² ≤ max_i Σ_j ‖h_i − h_j‖²``.

    Returns ``(malicious update, γ)``; γ = 0 (the mean) when no tried γ passes."""
    mean, perturbation = honest.mean(axis=0), -_spread(honest)
    pairwise = np.stack([_sq_distances(honest, h) for h in honest])
    if objective == "min-max":
        bound, score = pairwise.max(), lambda m: _sq_distances(honest, m).max()
    elif objective == "min-sum":
        bound, score = pairwise.sum(axis=1).max(), lambda m: _sq_distances(honest, m).sum()
    else:
        raise ValueError(f"min_max_or_sum: objective {objective!r} is neither 'min-max' nor 'min-sum'")
    # Their search: step by half the last step, up when the bound holds, down when it does not.
    gamma, step, success = gamma_init, gamma_init, 0.0
    while abs(success - gamma) > threshold:
        if score(mean + gamma * perturbation) <= bound:
            success = gamma
            gamma += step / 2
        else:
            gamma -= step / 2
        step /= 2
    return mean + success * perturbation, success


def malicious_update(
    attack: str, honest: np.ndarray, num_clients: int, num_attackers: int, z: float = 0.0, epsilon: float = 0.1
) -> tuple[np.ndarray, dict[str, Any]]:
    """The colluders' update from the honest ones (rows), and the attack's parameters as used.

    ``z`` = 0 takes ALIE's z_max for ``num_clients`` clients of which ``num_attackers`` attack."""
    if attack == "alie":
        z = z or alie_z_max(num_clients, num_attackers)
        return alie(honest, z), {"z": z}
    if attack == "ipm":
        return ipm(honest, epsilon), {"epsilon": epsilon}
    if attack in ("min-max", "min-sum"):
        update, gamma = min_max_or_sum(honest, attack)
        return update, {"gamma": gamma}
    raise ValueError(f"unknown omniscient attack {attack!r}")


def _flat(model: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray], keys: Sequence[str]) -> np.ndarray:
    return np.concatenate([(np.asarray(model[k], np.float64) - start[k]).ravel() for k in keys])


class ColludingAttack(Transform):
    """The server-side step of the test tool: replaces marked updates' models by the attack, first
    among the transforms (a defence such as norm bounding then bounds what the attackers sent)."""

    name = "colluding-attack"
    order = 0

    def __init__(self, attack: str, z: float = 0.0, epsilon: float = 0.1) -> None:
        if attack not in OMNISCIENT_ATTACKS:
            raise ValueError(f"ColludingAttack: {attack!r} is not one of {OMNISCIENT_ATTACKS}")
        self.attack, self.z, self.epsilon = attack, z, epsilon
        self.info: dict[str, Any] = {}

    def start(self) -> None:
        self.info = {}

    def apply(self, updates: list[Update], ctx: RoundContext) -> list[Update]:
        self.info = self.forge(updates, ctx.global_model)
        return updates

    def record(self) -> dict[str, Any]:
        return {"attack": self.info}  # which nodes attacked, for benchmarks to check

    def forge(self, updates: list[Update], start: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Edit the marked updates' models in place; what it did."""
        attackers = [u for u in updates if u.metrics.get(ATTACKER_METRIC)]
        honest = [u for u in updates if not u.metrics.get(ATTACKER_METRIC)]
        info: dict[str, Any] = {"name": self.attack, "attacker-nodes": [u.nodes[0] for u in attackers]}
        if not attackers:
            return info
        if not honest:  # nothing to know: the colluders' honest models go through unchanged
            info["skipped"] = "no honest update this round"
            return info
        keys = [k for k, v in start.items() if is_parameter(k, v)]
        rows = np.stack([_flat(u.model, start, keys) for u in honest])
        update, used = malicious_update(self.attack, rows, len(updates), len(attackers), self.z, self.epsilon)
        info.update(used)
        malicious, offset = {}, 0
        for k in keys:
            size = int(np.asarray(start[k]).size)
            value = np.asarray(start[k], np.float64) + update[offset : offset + size].reshape(np.shape(start[k]))
            malicious[k] = value.astype(np.asarray(start[k]).dtype)
            offset += size
        for u in attackers:  # statistics and counters stay the attacker's own (module docstring)
            u.model = {**u.model, **{k: v.copy() for k, v in malicious.items()}}
        return info

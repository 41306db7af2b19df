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

``fltrust-adaptive`` is the adaptive attack of FLTrust's own paper (Cao et al., NDSS 2021, after
Fang et al. 2020): the attackers also know the server's root-set update g₀ (full knowledge) and
choose their update's direction to push FLTrust's aggregate as far as possible from what it would
have been without the attack, keeping a positive cosine with g₀ so that they stay trusted
(:func:`fltrust_adaptive`).

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

OMNISCIENT_ATTACKS = ("alie", "ipm", "min-max", "min-sum", "fltrust-adaptive")
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


ADAPTIVE_STEPS = 200  # projected gradient-ascent steps of the FLTrust adaptive attack
ADAPTIVE_MIN_COSINE = 1e-3  # the attackers' direction stays this trusted (a cosine ≤ 0 is ignored)


def _fltrust_terms(rows: np.ndarray, g0: np.ndarray) -> tuple[np.ndarray, float]:
    """``(Σ TSᵢ·‖g₀‖/‖gᵢ‖·gᵢ, Σ TSᵢ)`` over rows, FLTrust's numerator and denominator."""
    root_norm = float(np.linalg.norm(g0))
    norms = np.linalg.norm(rows, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    trust = np.where(norms > 0, np.maximum(0.0, rows @ g0 / (safe * root_norm)), 0.0)
    return ((trust * root_norm / safe)[:, None] * rows).sum(axis=0), float(trust.sum())


def fltrust_adaptive(
    genuine: np.ndarray, attackers: Sequence[int], g0: np.ndarray, steps: int = ADAPTIVE_STEPS
) -> tuple[np.ndarray, dict[str, Any]]:
    """The colluders' update against FLTrust (rows of ``genuine``: every client's honest update;
    ``attackers``: the colluders' rows; ``g0``: the server's root-set update).

    Maximises ``‖g′ − g‖²``, g the FLTrust aggregate of the genuine updates and g′ the one with the
    colluders sending ``‖g₀‖·e`` (the norm FLTrust rescales to anyway), over unit directions e
    with cos(e, g₀) > 0, by projected gradient ascent with backtracking from the best of a few
    starts between g₀ and the direction opposite to g. All colluders send the same e (a symmetric
    start stays symmetric under the ascent)."""
    root_norm = float(np.linalg.norm(g0))
    if root_norm == 0:
        raise ValueError("fltrust-adaptive: the server's root-set update is zero")
    u = g0 / root_norm
    num, den = _fltrust_terms(genuine, g0)
    target = num / den if den > 0 else np.zeros_like(g0)  # the aggregate without the attack
    honest = np.delete(genuine, list(attackers), axis=0)
    benign_num, benign_den = _fltrust_terms(honest, g0) if len(honest) else (np.zeros_like(g0), 0.0)
    f = len(attackers)

    def aggregate(e: np.ndarray) -> tuple[np.ndarray, float, float]:
        c = max(float(e @ u), 0.0)
        d = benign_den + f * c
        return ((benign_num + f * root_norm * c * e) / d if d > 0 else np.zeros_like(g0)), c, d

    def objective(e: np.ndarray) -> float:
        return float(np.sum((aggregate(e)[0] - target) ** 2))

    away = -(target - (target @ u) * u)
    if np.linalg.norm(away) < 1e-12:  # the aggregate lies along g₀: any orthogonal direction
        away = np.random.default_rng(0).normal(size=g0.shape)
        away -= (away @ u) * u
    away /= np.linalg.norm(away)
    starts = [c * u + np.sqrt(1 - c * c) * away for c in (0.02, 0.1, 0.3, 0.6, 0.9)]
    e = max(starts, key=objective)
    best, taken = objective(e), 0
    for _ in range(steps):
        g_agg, c, d = aggregate(e)
        diff = g_agg - target
        grad = (2 * f / d) * (root_norm * c * diff + u * float((root_norm * e - g_agg) @ diff))
        if not np.linalg.norm(grad) > 0:
            break
        step, improved = 1.0, False
        while step > 1e-4:
            candidate = e + step * grad / np.linalg.norm(grad)
            candidate /= np.linalg.norm(candidate)
            if candidate @ u >= ADAPTIVE_MIN_COSINE and (value := objective(candidate)) > best:
                e, best, improved = candidate, value, True
                break
            step /= 2
        if not improved:
            break
        taken += 1
    return root_norm * e, {"cosine": float(e @ u), "deviation": float(np.sqrt(best)), "ascent-steps": taken}


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
        self.root_trainer: Any = None

    def bind(self, resources: Mapping[str, Any]) -> None:
        """What the server built: FLTrust's root trainer, whose update the adaptive attack knows."""
        self.root_trainer = resources.get("root_trainer")
        if self.attack == "fltrust-adaptive" and self.root_trainer is None:
            raise ValueError('attack="fltrust-adaptive" attacks FLTrust: it needs fusion-fn="fltrust"')

    def start(self) -> None:
        self.info = {}

    def apply(self, updates: list[Update], ctx: RoundContext) -> list[Update]:
        self.info = self.forge(updates, ctx.global_model, ctx.server_round)
        return updates

    def record(self) -> dict[str, Any]:
        return {"attack": self.info}  # which nodes attacked, for benchmarks to check

    def forge(self, updates: list[Update], start: Mapping[str, np.ndarray], server_round: int = 0) -> dict[str, Any]:
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
        if self.attack == "fltrust-adaptive":
            genuine = np.stack([_flat(u.model, start, keys) for u in updates])
            g0 = _flat(self.root_trainer(start, server_round), start, keys)
            marked = [i for i, u in enumerate(updates) if u.metrics.get(ATTACKER_METRIC)]
            update, used = fltrust_adaptive(genuine, marked, g0)
        else:
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

"""TEST TOOL: simulated malicious clients, for robustness experiments in the in-process federation.

Not part of the app: nothing here is in the app bundle, and no run config of a real federation can
name an attack (``fedvideo run`` refuses ``attack`` as an unknown key). Benchmarks and tests give
``run_inprocess`` the test tool's keys beside the run config; :func:`split_attack` takes them out:

- ``attack``: ``sign-flip`` / ``noise`` (the update ``start ± attack-scale × delta``, or Gaussian
  noise of ``attack-scale`` × the delta's std, on learnable parameters), ``label-flip`` (trains on
  labels ``C − 1 − y``), ``free-rider`` (sends the global model back untrained), or an omniscient
  colluding attack ``alie`` / ``ipm`` / ``min-max`` / ``min-sum`` / ``fltrust-adaptive`` (the
  attacker trains honestly and marks its reply; the server-side stage
  ``strategies.attacks.ColludingAttack`` forges the model; the last only against FLTrust);
- ``attack-fraction``: the first ``round(fraction × N)`` partitions attack;
- ``attack-scale``, ``attack-z`` (ALIE's z; 0: the paper's z_max), ``attack-epsilon`` (IPM's ε).

A forged BatchNorm running variance could be negative, which screening rejects: the attacker
modelled here poisons learnable parameters only and passes screening.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from flwr.clientapp import ClientApp

from fedapp.client.app import build_client_app, make_client, node_settings
from fedapp.client.video_client import VideoClient
from fedapp.task.models import build_model
from strategies.attacks import ATTACKER_METRIC, OMNISCIENT_ATTACKS, ColludingAttack
from strategies.stage import Transform

ATTACKS = ("none", "sign-flip", "noise", "label-flip", "free-rider", *OMNISCIENT_ATTACKS)
UPDATE_ATTACKS = ("sign-flip", "noise")  # computed on the client from its own update
KEYS = {"attack": "none", "attack-fraction": 0.0, "attack-scale": 10.0, "attack-z": 0.0, "attack-epsilon": 0.1}


@dataclass(frozen=True)
class AttackPlan:
    """Which clients attack and how (the test tool's keys, typed and checked)."""

    attack: str
    fraction: float
    scale: float = 10.0
    z: float = 0.0
    epsilon: float = 0.1

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS[1:]:
            raise ValueError(f"attack={self.attack!r}: choose one of {', '.join(ATTACKS[1:])}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"attack-fraction={self.fraction!r}: allowed (0, 1] (the share of clients that attack)")
        if self.scale < 0 or self.z < 0 or self.epsilon <= 0:
            raise ValueError("attack-scale and attack-z must be >= 0, attack-epsilon > 0")

    def attacks(self, partition_id: int, num_partitions: int) -> bool:
        """Whether this partition plays the attacker (the first ``round(fraction × n)`` ones)."""
        return partition_id < round(self.fraction * num_partitions)

    def check(self, num_nodes: int, cfg: Any) -> None:
        """Refuse a plan under which no client of ``num_nodes`` attacks, or one the run cannot simulate."""
        if self.attack in OMNISCIENT_ATTACKS and cfg.dp != "none":
            # Server-side DP clips inside Flower's wrapper before the inner strategy (where the tool
            # forges) aggregates: the forged model would skip the clipping real replies get.
            raise ValueError(f'attack={self.attack!r} is not simulated with dp={cfg.dp!r}: set dp="none"')
        if cfg.secagg:
            # The tool forges or reads individual updates on the server, which secure aggregation hides.
            raise ValueError(
                f"attack={self.attack!r} is not simulated with secagg=true: the server sees no single update"
            )
        if self.attack == "fltrust-adaptive" and not (cfg.strategy == "fusion" and cfg.fusion_fn == "fltrust"):
            raise ValueError(
                'attack="fltrust-adaptive" is FLTrust\'s own adaptive attack: run it with fusion-fn="fltrust"'
            )
        if round(self.fraction * num_nodes) == 0:
            raise ValueError(
                f"attack={self.attack!r} with attack-fraction={self.fraction}: round({self.fraction} × {num_nodes} "
                f"nodes) = 0 clients attack; raise attack-fraction to at least {0.5 / num_nodes:.2f}"
            )

    def server_stages(self) -> list[Transform]:
        """The server-side stage an omniscient attack needs (none for the client-side attacks)."""
        if self.attack not in OMNISCIENT_ATTACKS:
            return []
        return [ColludingAttack(self.attack, z=self.z, epsilon=self.epsilon)]

    def client_app(self) -> ClientApp:
        """The app's ClientApp whose attacker partitions run :class:`AttackerClient`."""
        return build_client_app(functools.partial(make_attacking_client, self))


def split_attack(config: Mapping[str, Any]) -> tuple[AttackPlan | None, dict[str, Any]]:
    """``(the attack plan, the run config without the test tool's keys)``."""
    tool = {**KEYS, **{k: v for k, v in config.items() if k in KEYS}}
    rest = {k: v for k, v in config.items() if k not in KEYS}
    if tool["attack"] == "none":
        if tool["attack-fraction"]:
            raise ValueError(f"attack-fraction={tool['attack-fraction']} without an attack")
        return None, rest
    plan = AttackPlan(tool["attack"], float(tool["attack-fraction"]), float(tool["attack-scale"]),
                      float(tool["attack-z"]), float(tool["attack-epsilon"]))  # fmt: skip
    return plan, rest


def make_attacking_client(plan: AttackPlan, cfg: Any, node_config: Mapping[str, Any], *args: Any) -> VideoClient:
    """The app's client for this node, an :class:`AttackerClient` on an attacker partition."""
    partition_id, num_partitions, _ = node_settings(node_config)
    if not plan.attacks(partition_id, num_partitions):
        return make_client(cfg, node_config, *args)
    return make_client(cfg, node_config, *args, client_class=functools.partial(AttackerClient, plan=plan))


class AttackerClient(VideoClient):
    """A VideoClient that attacks as ``plan`` says."""

    def __init__(self, *args: Any, plan: AttackPlan, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plan = plan
        if plan.attack == "label-flip":  # y → C − 1 − y on every training video
            last = len(self.classes) - 1
            self.train_samples = [replace(s, label=last - s.label) for s in self.train_samples]

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        server_round = int(config.get("server-round", 0))
        if self.plan.attack == "free-rider":  # the global model back, untrained (a zero update)
            metrics = {"base-round": server_round, **self._data_metrics(self.train_samples)}
            return list(parameters), len(self.train_samples), metrics
        arrays, count, metrics = super().fit(parameters, config)
        if self.plan.attack in UPDATE_ATTACKS:
            # The client's own clip-order seed: a reproducible, different draw per client and round.
            seed = (self.cfg.seed * 1_000_003 + server_round * 1009 + self.partition_id) % 2**31
            model = build_model(self.cfg.model, len(self.classes), pooling=self.cfg.pooling)
            learnable = {name for name, _ in model.named_parameters()}
            poison = [key in learnable for key in model.state_dict()]
            arrays = poison_update(parameters, arrays, self.plan.attack, self.plan.scale, np.random.default_rng(seed),
                                   poison)  # fmt: skip
        if self.plan.attack in OMNISCIENT_ATTACKS:
            metrics = {**metrics, ATTACKER_METRIC: 1}
        return arrays, count, metrics


def poison_update(
    start: Sequence[np.ndarray],
    trained: Sequence[np.ndarray],
    attack: str,
    scale: float,
    rng: np.random.Generator,
    poison: Sequence[bool] | None = None,
) -> list[np.ndarray]:
    """The model an attacker sends instead of ``trained``; ``poison`` marks the tensors to tamper
    with (default: all floating ones)."""
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

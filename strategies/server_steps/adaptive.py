"""What FedAdam, FedYogi and FedAdagrad share (Reddi et al., 2021): moments, checkpointing, the lr bound.

Not a stage itself: ``adam.py``, ``yogi.py`` and ``adagrad.py`` register its subclasses."""

from __future__ import annotations

from typing import Any

import numpy as np

from strategies.server_optimizer import adaptive_step
from strategies.stage import Model, ServerStep


class AdaptiveStep(ServerStep):
    """An adaptive server optimizer; ``name`` selects its second-moment rule in ``adaptive_step``."""

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.moments: dict[str, dict[str, np.ndarray]] | None = None  # {"m": ..., "v": ...}, None until a step

    @classmethod
    def from_config(cls, cfg: Any, resources: dict[str, Any]) -> AdaptiveStep:
        return cls(cfg.server_lr, cfg.server_beta1, cfg.server_beta2, cfg.server_tau)

    @classmethod
    def checks(cls, cfg: Any) -> list[str]:
        if cfg.server_lr < 1.0:
            return []
        # An adaptive step moves every coordinate by about server-lr: 1 wipes the model in a round.
        return [
            f"server-lr={cfg.server_lr!r} is out of range with server-optimizer={cfg.server_optimizer!r}: allowed "
            f"(0, 1) (each coordinate moves by about server-lr per round; 0 takes {cls.name}'s default "
            f"{cls.default_lr})"
        ]

    def step(self, current: Model, merged: Model, server_round: int) -> Model:
        new, self.moments = adaptive_step(
            current or merged, merged, self.moments, server_round, self.name, self.lr, self.beta1, self.beta2, self.tau
        )
        return new

    def state(self) -> dict[str, Any]:
        moments = self.moments or {}
        return {"server-m": moments.get("m"), "server-v": moments.get("v")}

    def load_state(self, state: dict[str, Any]) -> None:
        m, v = state.get("server-m"), state.get("server-v")
        self.moments = (
            {"m": {k: np.asarray(x) for k, x in m.items()}, "v": {k: np.asarray(x) for k, x in v.items()}}
            if m and v
            else None
        )

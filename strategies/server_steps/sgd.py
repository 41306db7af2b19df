"""Plain server step (FedAvg: the aggregate itself) or SGD with momentum on the pseudo-gradient (FedAvgM)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedapp.config.keys import Key
from strategies.server_optimizer import server_step
from strategies.stage import Model, ServerStep, register


@register
class SGD(ServerStep):
    name = "sgd"
    needs = 'server-optimizer="sgd"'
    default_lr = 1.0
    keys = (Key("server-momentum", 0.0, "server momentum on the pseudo-gradient (FedAvgM; 0: off)", low=0.0, high=1.0),)

    def __init__(self, lr: float = 1.0, momentum: float = 0.0) -> None:
        self.lr, self.momentum = lr, momentum
        self.velocity: dict[str, np.ndarray] | None = None

    @classmethod
    def from_config(cls, cfg: Any, resources: dict[str, Any]) -> SGD:
        return cls(cfg.server_lr, cfg.server_momentum)

    def step(self, current: Model, merged: Model, server_round: int) -> Model:
        new, self.velocity = server_step(current or merged, merged, self.velocity, self.lr, self.momentum)
        return new

    def state(self) -> dict[str, Any]:
        return {"velocity": self.velocity}

    def load_state(self, state: dict[str, Any]) -> None:
        velocity = state.get("velocity")
        self.velocity = {k: np.asarray(v) for k, v in velocity.items()} if velocity else None

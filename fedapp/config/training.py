"""Keys of local training on each client (read by ``fedapp.task.train`` and ``fedapp.client``;
declared here so that validating a config never imports torch)."""

from __future__ import annotations

from typing import Any

from fedapp.config.keys import Key, Owner

OPTIMIZERS = ("sgd", "adam", "adamw")


def _workers(value: int) -> str | None:
    if value >= -1:
        return None
    return f"num-workers={value!r} is out of range: allowed -1 (auto: this process's CPUs minus one) or >= 0"


def _device(value: str) -> str | None:
    if value in ("auto", "cpu", "cuda") or value.startswith("cuda:"):
        return None
    return f"device={value!r} is not allowed: choose auto, cpu, cuda or cuda:N"


def _sgd(cfg: Any) -> bool:
    return cfg.optimizer == "sgd"


TRAINING = Owner(
    "local training",
    keys=(
        Key("local-epochs", 2, "epochs over the client's clips per round", low=1),
        Key("batch-size", 8, "clips per step", low=1),
        Key("optimizer", "adamw", "the client optimizer", choices=OPTIMIZERS),
        Key("lr", 0.002, "the client learning rate", low=0.0, low_open=True),
        Key("momentum", 0.9, "SGD momentum", low=0.0, high=1.0, when=_sgd, needs='optimizer="sgd"'),
        Key("weight-decay", 0.0001, "weight decay", low=0.0),
        Key("client-momentum", 0.0, "momentum a client keeps across rounds and sends (0: off)", low=0.0, high=0.99),
        Key("fedbn", False, "keep BatchNorm layers local (FedBN): never sent, never averaged"),
        Key("num-workers", 0, "decoding processes per client (-1: CPUs minus one)", check=_workers),
        Key("torch-threads", 0, "torch threads per process (0: torch's default)", low=0),
        Key("device", "auto", "auto, cpu, cuda or cuda:N", check=_device),
        Key("bf16", True, "bfloat16 autocast on CUDA"),
        Key("channels-last", True, "channels-last memory layout on CUDA"),
        Key("seed", 0, "seeds the initial model, data order and bucketing"),
    ),
)
OWNERS = (TRAINING,)

"""The stages a strategy is composed of, and the registry that finds them by name.

A round's accepted updates go through the active **transforms** (``strategies/transforms/``: norm
bound, nearest-neighbour mixing, bucketing), then one **aggregator** (``strategies/aggregators/``:
the rule that makes one model of many), then one **server step** (``strategies/server_steps/``:
plain or momentum SGD, Adam, Yogi, Adagrad) from the global model towards that result. Each stage
is one file that declares the run-config keys it reads next to its code and registers itself by
name; a new file in one of those folders is found without editing anything else.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fedapp.config.keys import Key, Owner

Model = dict[str, np.ndarray]
KINDS = {
    "aggregator": "strategies.aggregators",
    "transform": "strategies.transforms",
    "server-step": "strategies.server_steps",
}
_REGISTRY: dict[str, dict[str, type[Stage]]] = {kind: {} for kind in KINDS}
_LISTED: dict[str, tuple[str, ...]] = {}  # the package paths each stage folder was last listed for


@dataclass
class Update:
    """One model an aggregator sees: a client's update, or a mix of several (``nodes``)."""

    model: Model
    count: float  # sample count (a bucket: the sum of its clients')
    nodes: list[int]
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoundContext:
    """What stages may read about the round: its number and the global model the updates start from
    (empty when a stage is used outside a round)."""

    server_round: int
    global_model: Model


class Stage:
    """A named step of a strategy, built from the run config by :meth:`from_config`."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    keys: ClassVar[tuple[Key, ...]] = ()  # the run-config keys this stage declares
    reads: ClassVar[tuple[str, ...]] = ()  # keys declared by another stage that this one reads too
    needs: ClassVar[str] = ""  # when it is selected, in the user's words

    @classmethod
    def selected(cls, cfg: Any) -> bool:
        """Whether ``cfg`` selects this stage (its keys may be set)."""
        raise NotImplementedError

    @classmethod
    def checks(cls, cfg: Any) -> list[str]:
        """What must hold between keys when this stage is selected: one problem per broken rule."""
        return []

    @classmethod
    def from_config(cls, cfg: Any, resources: dict[str, Any]) -> Stage:
        """The stage as ``cfg`` configures it; ``resources``: what the server built for it (FedDF's distiller)."""
        return cls()

    @classmethod
    def owner(cls) -> Owner:
        return Owner(f'{cls.kind} "{cls.name}"', cls.keys, cls.reads, cls.selected, cls.needs, (cls.checks,))

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps to resume this stage."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's :meth:`state`."""


class Aggregator(Stage):
    """Makes one model of the round's updates. ``family``: averaging, weighted or fusion (the
    ``strategy`` key); fusion rules are named by ``fusion-fn``."""

    kind = "aggregator"
    family: ClassVar[str] = "fusion"
    mixable: ClassVar[bool] = True  # takes nearest-neighbour mixing or bucketing before it
    # The result is the mean of the replies weighted by what each carries on its own (``weight``):
    # then replies are folded into a running mean as they arrive and dropped.
    folds: ClassVar[bool] = False

    @classmethod
    def selected(cls, cfg: Any) -> bool:
        return aggregator_name(cfg) == cls.name

    def weight(self, metrics: dict[str, Any]) -> float:
        """A reply's weight in the running mean (``folds`` only)."""
        raise NotImplementedError

    def aggregate(self, updates: list[Update], ctx: RoundContext) -> tuple[Model, dict[str, Any]]:
        """``(merged model, what the rule decided)``."""
        raise NotImplementedError


class Transform(Stage):
    """Changes the updates before aggregation; ``order`` places it (lower first). A transform with
    ``one_by_one`` works on each update alone, so replies can still be folded as they arrive."""

    kind = "transform"
    order: ClassVar[int] = 50
    one_by_one: ClassVar[bool] = False

    @classmethod
    def active(cls, cfg: Any) -> bool:
        """Whether ``cfg`` switches this transform on."""
        raise NotImplementedError

    def start(self) -> None:
        """A new round begins."""

    def apply(self, updates: list[Update], ctx: RoundContext) -> list[Update]:
        return [self.apply_one(u, ctx) for u in updates]

    def apply_one(self, update: Update, ctx: RoundContext) -> Update:
        raise NotImplementedError(f"transform {self.name!r} needs all updates at once")

    def record(self) -> dict[str, Any]:
        """What it did this round, merged into the round's ``fusion`` record."""
        return {}


class ServerStep(Stage):
    """Moves the global model towards the aggregate (``server-optimizer``)."""

    kind = "server-step"
    default_lr: ClassVar[float] = 1.0

    @classmethod
    def selected(cls, cfg: Any) -> bool:
        return cfg.server_optimizer == cls.name

    def step(self, current: Model, merged: Model, server_round: int) -> Model:
        raise NotImplementedError


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage findable by its kind and name."""
    known = _REGISTRY[cls.kind]
    if cls.name in known and known[cls.name] is not cls:
        raise RuntimeError(f"two {cls.kind} stages are named {cls.name!r}: {known[cls.name]} and {cls}")
    known[cls.name] = cls
    return cls


def discover() -> None:
    """Import every stage file of the stage folders, so that each registers itself. Each folder is
    listed once per set of paths (the registry is read on every config parse, which clients do
    per message); a package path that changes is listed again."""
    for package_name in KINDS.values():
        package = importlib.import_module(package_name)
        paths = tuple(package.__path__)
        if _LISTED.get(package_name) == paths:
            continue
        for info in pkgutil.iter_modules(paths):
            importlib.import_module(f"{package_name}.{info.name}")
        _LISTED[package_name] = paths


def registered(kind: str) -> dict[str, type[Stage]]:
    """The stages of ``kind`` by name, in name order."""
    discover()
    return dict(sorted(_REGISTRY[kind].items()))


def aggregator_name(cfg: Any) -> str:
    """The aggregator ``cfg`` selects: the fusion rule for ``strategy="fusion"``, else the strategy's own."""
    return cfg.fusion_fn if cfg.strategy == "fusion" else cfg.strategy


def fusion_rules() -> tuple[str, ...]:
    """The built-in ``fusion-fn`` names."""
    return tuple(name for name, cls in registered("aggregator").items() if cls.family == "fusion")


def strategies() -> tuple[str, ...]:
    """The ``strategy`` names: the averaging and weighted aggregators, and ``fusion``."""
    own = [name for name, cls in registered("aggregator").items() if cls.family != "fusion"]
    return (*sorted(own, key=lambda n: (n != "fedavg", n)), "fusion")


def stage_owners() -> list[Owner]:
    """Every registered stage as the owner of its keys."""
    return [cls.owner() for kind in KINDS for cls in registered(kind).values()]

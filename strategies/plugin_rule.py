"""A user's own aggregation rule, named in the run config as ``fusion-fn = "module:function"``.

The function takes the round's models (``list[dict[str, np.ndarray]]``, by tensor name) and their
weights (sample counts) and returns the merged model, or ``(model, info)`` with a dict of what it
decided (kept in the round record). ``"module:Class"`` names a class instantiated once with no
arguments, whose instances are called the same way (a rule that keeps state across rounds). The
rule gets everything a built-in gets: screened replies, the transforms before it, the server
step after it, and its output checked against the global model (names, shapes, finite values;
each tensor is cast to the global model's dtype) before it is used.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from strategies.stage import Aggregator, Model, RoundContext, Update

Rule = Callable[[list[Model], list[float]], Any]


class PluginRule(Aggregator):
    """Adapts a user's rule to the aggregator stage; ``name`` is its ``module:attribute``."""

    family = "fusion"

    def __init__(self, spec: str, rule: Rule) -> None:
        self.name = spec  # type: ignore[misc]  # each plug-in is named by what the config says
        self.rule = rule

    def aggregate(self, updates: list[Update], ctx: RoundContext) -> tuple[Model, dict[str, Any]]:
        out = self.rule([u.model for u in updates], [u.count for u in updates])
        merged, info = out if isinstance(out, tuple) and len(out) == 2 else (out, {})
        if not isinstance(merged, dict) or not isinstance(info, dict):
            raise ValueError(f"{self.name} returned {type(out).__name__}, not a dict of arrays (or (dict, dict))")
        model = {}
        for key, value in merged.items():
            array = np.asarray(value)
            reference = ctx.global_model.get(key)
            model[key] = array.astype(reference.dtype, copy=False) if reference is not None else array
        try:  # the round record is JSON: numpy scalars and arrays become numbers and lists
            info = json.loads(json.dumps(info, default=_plain))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{self.name} returned info that is not JSON: {exc}") from None
        return model, {"rule": self.name, **info}


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")

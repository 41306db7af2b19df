"""Checks on client replies before they reach aggregation: a bad reply is rejected, never fatal."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def reference_spec(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Names, shapes and dtypes of the global model, which every update must match."""
    return {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in arrays.items()}


def check_update(
    arrays: Mapping[str, np.ndarray],
    num_examples: Any,
    spec: Mapping[str, tuple[tuple[int, ...], np.dtype]],
) -> str | None:
    """Return why an update is unusable, or ``None`` when it is fine."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | float):
        return f"num-examples is {num_examples!r}, not a number"
    if not np.isfinite(num_examples) or num_examples <= 0:
        return f"num-examples is {num_examples}, must be > 0"
    return check_tensors(arrays, spec)


def check_tensors(arrays: Mapping[str, np.ndarray], spec: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> str | None:
    """Why named tensors do not match ``spec`` (names, shapes, dtypes, finite values, variances),
    or ``None``: a model against the global one, SCAFFOLD's Δcᵢ against the control variate."""
    missing = spec.keys() - arrays.keys()
    extra = arrays.keys() - spec.keys()
    if missing or extra:
        return f"tensor names differ from the global model (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})"
    for key, (shape, dtype) in spec.items():
        value = np.asarray(arrays[key])
        if value.shape != shape:
            return f"tensor {key!r} has shape {value.shape}, expected {shape}"
        if value.dtype != dtype:
            return f"tensor {key!r} has dtype {value.dtype}, expected {dtype}"
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return f"tensor {key!r} has non-finite values"
        if key.endswith("running_var") and (value < 0).any():
            return f"tensor {key!r} has negative variances"
    return None


def is_unchanged(arrays: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray]) -> bool:
    """Whether an update is the global model itself: every tensor equal to what was sent.

    Such a reply trained nothing (an idle or free-riding client) and would only pull the aggregate
    back towards the old model while claiming its sample count; with several of them a rank- or
    distance-based rule sees a tight cluster of identical updates and picks it."""
    return bool(current) and all(np.array_equal(arrays[k], v) for k, v in current.items() if k in arrays)

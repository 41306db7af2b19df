"""Conversions between Flower's ArrayRecord and ordered ``{name: ndarray}`` models."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> ordered ``{name: ndarray}``."""
    return {key: array.numpy() for key, array in record.items()}


def numpy_to_arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Ordered ``{name: ndarray}`` -> ArrayRecord (names kept, so ``to_torch_state_dict`` works).

    ``np.asarray``, not ``ascontiguousarray``: the latter turns 0-d tensors (BatchNorm's
    ``num_batches_tracked``) into 1-d ones.
    """
    return ArrayRecord({key: Array(np.asarray(value)) for key, value in arrays.items()})

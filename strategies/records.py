"""Conversions between Flower's ArrayRecord and ordered ``{name: ndarray}`` models.

:func:`arrays_to_numpy` and :func:`numpy_to_arrays` are the only two conversions; every other piece
of code converts through them. :class:`NamedArrays` is one model held in both forms, each tensor
converted at most once in each direction, for code that passes one model along several layers
(the client's mods and the NumPyClient bridge) without converting it again in each.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord


def arrays_to_numpy(record: Mapping[str, Array]) -> dict[str, np.ndarray]:
    """ArrayRecord (or any ``{name: Array}``) -> ordered ``{name: ndarray}``."""
    return {key: array.numpy() for key, array in record.items()}


def numpy_to_arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Ordered ``{name: ndarray}`` -> ArrayRecord (names kept, so ``to_torch_state_dict`` works).

    ``np.asarray``, not ``ascontiguousarray``: the latter turns 0-d tensors (BatchNorm's
    ``num_batches_tracked``) into 1-d ones.
    """
    return ArrayRecord({key: Array(np.asarray(value)) for key, value in arrays.items()})


class NamedArrays:
    """One model's tensors by name, as Flower ``Array`` s (serialized) and/or numpy arrays.

    Built from either form; the other form of a tensor is made on first request, through
    :func:`arrays_to_numpy` / :func:`numpy_to_arrays`, and kept. Tensors are always addressed by
    name; the order is the one the model came in. The numpy arrays are shared by everyone holding
    this object, not copied: callers must not modify them in place.
    """

    def __init__(
        self, record: Mapping[str, Array] | None = None, *, numpy: Mapping[str, np.ndarray] | None = None
    ) -> None:
        if (record is None) == (numpy is None):
            raise TypeError("NamedArrays takes a record or numpy arrays, exactly one of them")
        source: Mapping[str, object] = record if record is not None else numpy  # type: ignore[assignment]
        self._names = list(source)
        # A snapshot of the record's Arrays: a later change to that record does not reach this view.
        self._arrays: dict[str, Array] = dict(record.items()) if record is not None else {}
        self._numpy: dict[str, np.ndarray] = dict(numpy) if numpy is not None else {}
        # Handed back by record() as is: a model that came as an ArrayRecord leaves as the same one.
        self._record = record if isinstance(record, ArrayRecord) else None

    @property
    def names(self) -> list[str]:
        """The tensor names, in the model's order."""
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._numpy or name in self._arrays

    def numpy(self) -> dict[str, np.ndarray]:
        """``{name: ndarray}`` in order; decodes (once) the tensors only held as Arrays so far."""
        missing = {k: self._arrays[k] for k in self._names if k not in self._numpy}
        if missing:
            self._numpy.update(arrays_to_numpy(missing))
        return {k: self._numpy[k] for k in self._names}

    def record(self) -> ArrayRecord:
        """The model as an ArrayRecord; encodes (once) the tensors only held as numpy so far."""
        if self._record is None:
            missing = {k: self._numpy[k] for k in self._names if k not in self._arrays}
            if missing:
                self._arrays.update(numpy_to_arrays(missing).items())
            record = ArrayRecord()
            for name in self._names:
                record[name] = self._arrays[name]  # the same Array objects: no copy, no encoding
            self._record = record
        return self._record

    def select(self, names: Iterable[str]) -> NamedArrays:
        """The tensors ``names``, in that order, with every form converted so far (KeyError if absent)."""
        out = NamedArrays.__new__(NamedArrays)
        out._names = list(names)
        for name in out._names:
            if name not in self:
                raise KeyError(name)
        out._arrays = {k: self._arrays[k] for k in out._names if k in self._arrays}
        out._numpy = {k: self._numpy[k] for k in out._names if k in self._numpy}
        out._record = None
        return out

    def updated(self, other: NamedArrays) -> NamedArrays:
        """This model, in its order, with the tensors of ``other`` in place of its own."""
        unknown = [k for k in other._names if k not in self]
        if unknown:
            raise KeyError(f"tensors {unknown[:5]} are not in the model")
        out = self.select(self._names)
        for name in other._names:
            out._arrays.pop(name, None)
            out._numpy.pop(name, None)
            if name in other._arrays:
                out._arrays[name] = other._arrays[name]
            if name in other._numpy:
                out._numpy[name] = other._numpy[name]
        return out

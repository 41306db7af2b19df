"""Coordinate-wise fusion rules as plain numpy: the median (Yin et al., 2018; Flower's FedMedian)
and the trimmed mean (Flower's FedTrimmedAvg).

Each rule walks the models in cache-sized coordinate blocks (``strategies.blocks``) on the
configured threads, and sorts each block's N values with a sorting network of vectorized min/max
steps. Extra memory is the output model plus a few blocks per thread, whatever N. Every output
tensor is cast back to its input dtype (integers rounded).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from strategies.aggregation import Weights
from strategies.blocks import WIDE_BLOCK_BYTES, Span, block_length, flat_views, gather, run_in_blocks, spans
from strategies.fusion import Models, model_keys


def coordinate_median(models: Models) -> Weights:
    """Coordinate-wise median; equals Flower's FedMedian (``np.median`` over the stacked clients)."""
    model_keys(models)  # empty or mismatched models fail here, with the offending model named
    n = len(models)
    middle = (n // 2,) if n % 2 else (n // 2 - 1, n // 2)
    return _coordinatewise(models, middle, lambda rows: _midpoint(rows))


def trimmed_mean(models: Models, beta: float) -> Weights:
    """Coordinate-wise mean after dropping the ``int(beta * N)`` lowest and highest values.

    Equals Flower's FedTrimmedAvg(beta) (scipy's ``trim_mean``) to float rounding: the kept values
    are summed in float64 here. The cut is ``int(beta * N)`` computed in floating point, so e.g.
    beta=0.29, N=100 cuts 28 per side, not 29.
    """
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trimmed-mean beta must be in [0, 0.5), got {beta}")
    model_keys(models)
    n = len(models)
    cut = int(beta * n)
    # beta < 0.5 guarantees 2 * cut < n, so at least one value per coordinate survives.
    return _coordinatewise(models, tuple(range(cut, n - cut)), _mean_of_rows)


def _midpoint(rows: list[np.ndarray]) -> np.ndarray:
    # np.median's arithmetic: the middle value, or the two middle ones summed and halved in their dtype.
    return rows[0] if len(rows) == 1 else (rows[0] + rows[1]) * 0.5


def _mean_of_rows(rows: list[np.ndarray]) -> np.ndarray:
    total = rows[0].astype(np.float64)
    for row in rows[1:]:
        total += row
    return total / len(rows)


@functools.lru_cache(maxsize=64)
def sorting_network(n: int, wanted: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Comparators ``(i, j)``, i < j, that put the values at positions ``wanted`` where a full sort of
    ``n`` values would: Batcher's odd-even merge sort on the next power of two, minus comparators
    that touch the padding (which holds +inf and never moves) or feed no wanted position."""
    size = 1 << max(n - 1, 0).bit_length()
    pairs: list[tuple[int, int]] = []

    def merge(lo: int, hi: int, r: int) -> None:  # merges the sorted halves of [lo, hi) at stride r
        step = r * 2
        if step < hi - lo:
            merge(lo, hi, step)
            merge(lo + r, hi, step)
            pairs.extend((i, i + r) for i in range(lo + r, hi - r, step))
        else:
            pairs.append((lo, lo + r))

    def sort(lo: int, hi: int) -> None:
        if hi - lo > 1:
            mid = lo + (hi - lo) // 2
            sort(lo, mid)
            sort(mid, hi)
            merge(lo, hi, 1)

    sort(0, size)
    needed, kept = set(wanted), []
    for i, j in reversed([(i, j) for i, j in pairs if j < n]):
        if i in needed or j in needed:
            kept.append((i, j))
            needed |= {i, j}
    return tuple(reversed(kept))


def _coordinatewise(
    models: Models, wanted: tuple[int, ...], reduce: Callable[[list[np.ndarray]], np.ndarray]
) -> Weights:
    """Per coordinate, ``reduce`` of the values at sorted positions ``wanted``, block by block.

    A block holds every client's values of the block's coordinates as rows; the sorting network
    runs on whole rows (``np.minimum``/``np.maximum``: vectorized, in cache), so no per-coordinate
    sort or partition is ever called. Float32 tensors sort in float32; others in float64."""
    n = len(models)
    network = sorting_network(n, wanted)
    flats = {key: flat_views(models, key) for key in models[0]}
    out = {key: np.empty(np.shape(v), np.asarray(v).dtype) for key, v in models[0].items()}
    outs = {key: value.reshape(-1) for key, value in out.items()}

    def one_block(span: Span) -> None:
        key, start, stop = span
        target = outs[key][start:stop]
        work = np.float32 if target.dtype == np.float32 else np.float64
        block = gather(flats[key], start, stop, work, spare=1)
        # ``order[p]``: the buffer row holding sorted position p. A comparator writes the minimum
        # into the spare row and the maximum over row j, then the rows swap roles: two passes, no copy.
        order, spare = list(range(n)), n
        for i, j in network:
            low, high = block[order[i]], block[order[j]]
            np.minimum(low, high, out=block[spare])
            np.maximum(low, high, out=high)
            order[i], spare = spare, order[i]
        value = reduce([block[order[p]] for p in wanted])
        target[...] = np.rint(value) if np.issubdtype(target.dtype, np.integer) else value

    run_in_blocks(one_block, spans({k: v.size for k, v in outs.items()}, block_length(n + 1, 4, WIDE_BLOCK_BYTES)))
    return out

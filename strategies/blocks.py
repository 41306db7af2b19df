"""Cache-sized coordinate blocks and the threads that walk them: the engine under the aggregation
rules (``strategies.aggregation``, ``strategies.fusion``).

A rule that is a function of each coordinate's N client values (a mean, a median, a trimmed mean)
or a sum over coordinates (a distance) copies one block of coordinates from every client into a
small buffer that stays in a core's cache, computes there and writes the block's result. Each input
byte is then read from memory once and no full-size temporary exists. Blocks are independent, so
threads take them in parallel (numpy's loops and BLAS release the GIL); results are kept in block
order, so they do not depend on how many threads ran.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

# Bytes of one block buffer (N clients × the block's coordinates). The means make two numpy calls
# per client and block, so they take blocks that fit the 1 MiB L2 cache per core of the machine
# the figures in docs/BENCHMARKS.md come from (and of most server cores). The sorting network and
# the distances make tens of calls per block, whose Python overhead then sets the time: 4 MiB
# blocks (in the shared L3) were 1.2-1.5x faster for them there (bench/aggregation.py).
BLOCK_BYTES = 1 << 20
WIDE_BLOCK_BYTES = 4 << 20
# Fewest coordinates per block: below this the Python loop over blocks, not memory, sets the time.
MIN_BLOCK = 2048

T = TypeVar("T")
Span = tuple[str, int, int]  # (tensor name, first coordinate, one past the last)

_threads = 1
_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()
_scratch = threading.local()


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(threads: int) -> int:
    """Threads the aggregation rules use from now on; 0 means every CPU this process may use.
    Returns the number set."""
    global _threads, _pool
    if threads < 0:
        raise ValueError(f"aggregation threads must be >= 0 (0 = all CPUs), got {threads}")
    with _lock:
        _threads = threads or available_cpus()
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None
    return _threads


def get_threads() -> int:
    """Threads the aggregation rules use (1 until :func:`set_threads` says otherwise)."""
    return _threads


def run_in_blocks(fn: Callable[[T], object], items: Sequence[T], threaded: bool = True) -> list:
    """``[fn(item) for item in items]``, on the configured threads (``threaded``); results in
    ``items`` order."""
    global _pool
    if not threaded or _threads <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_threads, thread_name_prefix="aggregation")
        pool = _pool
    return list(pool.map(fn, items))


def block_length(rows: int, itemsize: int = 8, budget: int | None = None) -> int:
    """Coordinates per block so that ``rows`` rows of ``itemsize`` bytes fill ``budget`` bytes
    (default :data:`BLOCK_BYTES`)."""
    return max(MIN_BLOCK, (budget or BLOCK_BYTES) // (max(rows, 1) * itemsize))


def spans(sizes: Mapping[str, int], length: int) -> list[Span]:
    """Every tensor cut into blocks of at most ``length`` coordinates, in tensor order (empty
    tensors give one empty span, so each tensor is visited)."""
    out: list[Span] = []
    for key, size in sizes.items():
        out += [(key, start, min(start + length, size)) for start in range(0, size, length)] or [(key, 0, 0)]
    return out


def flat_views(models: Iterable[Mapping[str, np.ndarray]], key: str) -> list[np.ndarray]:
    """Each model's ``key`` as a flat array (a view of a contiguous tensor, no copy)."""
    return [np.asarray(m[key]).reshape(-1) for m in models]


def gather(flats: Sequence[np.ndarray], start: int, stop: int, dtype: np.dtype | type, spare: int = 0) -> np.ndarray:
    """Rows ``flats[i][start:stop]`` cast to ``dtype``, then ``spare`` rows of scratch, in this
    thread's reusable buffer.

    The buffer is per thread and reused (a fresh ~1 MiB array per block would be page-faulted in
    on every block); the caller must be done with it before its next ``gather`` of that shape."""
    rows, length = len(flats) + spare, stop - start
    key = (np.dtype(dtype).str, rows)
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buffer = buffers.get(key)
    if buffer is None or buffer.shape[1] < length:
        buffer = buffers[key] = np.empty((rows, length), dtype)
    out = buffer[:, :length]
    for row, flat in zip(out, flats):
        row[...] = flat[start:stop]
    return out

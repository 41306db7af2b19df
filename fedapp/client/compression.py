"""Update compression, the client's side: the encoder a node runs on its update before it leaves.

Plain numpy, no Flower; the payload format, and its decoder, are the server's
(``strategies.compression``). The lossy methods encode the *delta* (update − the global model the
server sent), which is far smaller than the weights themselves, so a per-tensor scale or float16
keeps much more of what training changed.

Top-k keeps ``ceil(topk-fraction · numel)`` entries *per tensor*, so every layer moves every round
(a model-wide top-k could starve layers whose deltas are small in absolute terms), and sends tensors
under ``TOPK_MIN_ELEMENTS`` whole (biases, BatchNorm); what is not sent becomes the residual, added
to the next round's delta (error feedback), so nothing is lost, only delayed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from strategies.compression import METHODS, SEP, decode_tensor

# Top-k sends smaller tensors whole: biases and BatchNorm parameters and statistics, whose one or
# two surviving entries per round would leave the running statistics out of step with the weights
# they normalise (the model then scores at chance), for well under 1 % of a model's bytes.
TOPK_MIN_ELEMENTS = 1024


def compress(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    method: str,
    topk_fraction: float = 0.01,
    residual: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Encode ``update`` against ``reference`` (the global model it was trained from).

    Returns ``(payload, residual)``: the arrays to send and, for ``topk``, the unsent part of each
    delta, to pass back as ``residual`` next round (empty for the other methods). A tensor is sent
    whole when it is not floating point, does not match the reference, would not get smaller, or
    would come back non-finite or with negative entries where the update had none (fp16 overflow,
    int8 rounding below zero of a BatchNorm variance): the server must never reject an honest update
    because of its encoding.
    """
    if method not in METHODS:
        raise ValueError(f"compression method {method!r} is not one of {', '.join(METHODS)}")
    if method == "topk" and not 0.0 < topk_fraction <= 1.0:
        raise ValueError(f"topk fraction {topk_fraction!r} must be in (0, 1]")
    residual = residual or {}
    payload: dict[str, np.ndarray] = {}
    new_residual: dict[str, np.ndarray] = {}
    for name, value in update.items():
        value = np.asarray(value)
        ref = np.asarray(reference[name]) if name in reference else None
        encoded = None
        # A non-finite update goes whole, for the server's checks to name it, not masked by encoding.
        if method != "none" and ref is not None and _floating_match(value, ref) and np.isfinite(value).all():
            delta = value - ref
            carried = residual.get(name) if method == "topk" else None
            if carried is not None and np.shape(carried) == delta.shape:
                delta = delta + np.asarray(carried, dtype=delta.dtype)
            encoded = _encode(delta, method, topk_fraction)
            if encoded is not None and not _faithful(value, decode_tensor(name, encoded, ref)):
                encoded = None  # sent whole; a top-k residual it carried is dropped with it
        if encoded is None:
            payload[name] = value
            continue
        payload.update({name + SEP + suffix: part for suffix, part in encoded.items()})
        if method == "topk":
            rest = delta.reshape(-1).copy()
            rest[encoded["idx"]] = 0
            new_residual[name] = rest.reshape(delta.shape)
    return payload, new_residual


def topk_count(numel: int, fraction: float) -> int:
    """Entries top-k keeps of a tensor: ``ceil(fraction · numel)``, at least 1."""
    # round() first: 0.07 * 100 is 7.000000000000001 in floating point, which must not become 8.
    return min(numel, max(1, math.ceil(round(fraction * numel, 9))))


def _floating_match(value: np.ndarray, ref: np.ndarray) -> bool:
    return np.issubdtype(value.dtype, np.floating) and value.dtype == ref.dtype and value.shape == ref.shape


def _faithful(value: np.ndarray, restored: np.ndarray) -> bool:
    """What the server rebuilds is finite, and a non-negative tensor stays non-negative."""
    return bool(np.isfinite(restored).all()) and not ((value >= 0).all() and (restored < 0).any())


def _encode(delta: np.ndarray, method: str, topk_fraction: float) -> dict[str, np.ndarray] | None:
    """The parts (keyed by suffix) encoding one delta, or ``None`` when sending it whole is no larger."""
    if method == "fp16":
        if delta.dtype.itemsize <= 2:
            return None
        with np.errstate(over="ignore"):  # beyond float16's range: inf, caught by _faithful
            return {"fp16": delta.astype(np.float16)}
    if method == "int8":
        if delta.nbytes <= delta.size + 4:
            return None
        peak = float(np.max(np.abs(delta))) if delta.size else 0.0
        scale = np.asarray(peak / 127.0, dtype=np.float32)
        if not np.isfinite(scale):  # finite weights whose difference overflows
            return None
        q = np.rint(delta / scale) if scale > 0 else np.zeros(delta.shape)
        q = np.clip(q, -127, 127).astype(np.int8)  # float32 rounding of the scale can give 127.00001
        return {"int8": np.asarray(q), "scale": scale}
    flat = delta.reshape(-1)
    if flat.size < TOPK_MIN_ELEMENTS:
        return None
    k = topk_count(flat.size, topk_fraction)
    index_dtype = np.int32 if flat.size <= np.iinfo(np.int32).max else np.int64
    if k * (np.dtype(index_dtype).itemsize + flat.itemsize) >= flat.nbytes:
        return None
    idx = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]).astype(index_dtype)
    return {"idx": idx, "val": flat[idx]}

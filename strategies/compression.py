"""Update compression: what a client sends instead of its full model, and how the server restores it.

Plain numpy, no Flower. The lossy methods encode the *delta* (update − the global model the server
sent), which is far smaller than the weights themselves, so a per-tensor scale or float16 keeps
much more of what training changed. A payload is ``{key: ndarray}``; each key is a tensor name,
alone or with one suffix:

- ``name``                          the tensor itself, sent whole (method ``none``, integer tensors,
                                    and any tensor a method would not shrink or would corrupt)
- ``name::fp16``                    the delta as float16
- ``name::int8``, ``name::scale``   the delta as int8 ``q`` and a float32 0-d scale: delta ≈ q · scale,
                                    scale = max|delta| / 127 (symmetric, per tensor)
- ``name::idx``, ``name::val``      top-k of the delta plus the error-feedback residual: int32 flat
                                    indices (int64 past 2³¹ elements), sorted, and their values in
                                    the tensor's dtype; every other entry keeps the global value

Top-k keeps ``ceil(topk-fraction · numel)`` entries *per tensor*, so every layer moves every round
(a model-wide top-k could starve layers whose deltas are small in absolute terms), and sends tensors
under ``TOPK_MIN_ELEMENTS`` whole (biases, BatchNorm); what is not sent
becomes the residual, added to the next round's delta (error feedback), so nothing is lost, only
delayed. :func:`decompress` of a payload of plain names is the identity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

METHODS = ("none", "fp16", "int8", "topk")
SEP = "::"
# Top-k sends smaller tensors whole: biases and BatchNorm parameters and statistics, whose one or
# two surviving entries per round would leave the running statistics out of step with the weights
# they normalise (the model then scores at chance), for well under 1 % of a model's bytes.
TOPK_MIN_ELEMENTS = 1024
# The parts each encoding is made of (by key suffix; "" = the plain tensor).
_ENCODINGS = {
    frozenset({""}): "plain",
    frozenset({"fp16"}): "fp16",
    frozenset({"int8", "scale"}): "int8",
    frozenset({"idx", "val"}): "topk",
}
_SUFFIXES = frozenset().union(*_ENCODINGS)


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
            if encoded is not None and not _faithful(value, _decode(name, encoded, ref)):
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


def decompress(payload: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rebuild full tensors from a payload; plain tensors pass through untouched.

    Raises ``ValueError`` naming the tensor for anything malformed: an unknown suffix, an
    incomplete or mixed set of parts, a compressed tensor the reference lacks or that is not
    floating point there, wrong dtypes or shapes, a bad scale, out-of-range or repeated indices.
    """
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in payload.items():
        name, suffix = key.rsplit(SEP, 1) if SEP in key else (key, "")
        if suffix not in _SUFFIXES or (SEP in key and not suffix):
            raise ValueError(f"payload key {key!r} has an unknown suffix {SEP}{suffix}")
        parts.setdefault(name, {})[suffix] = np.asarray(value)
    out: dict[str, np.ndarray] = {}
    for name, tensor_parts in parts.items():
        if set(tensor_parts) == {""}:
            out[name] = tensor_parts[""]
            continue
        ref = reference.get(name)
        if ref is None:
            raise ValueError(f"tensor {name!r} is compressed but the global model has no such tensor")
        out[name] = _decode(name, tensor_parts, np.asarray(ref))
    return out


def payload_bytes(payload: Mapping[str, np.ndarray]) -> int:
    """Bytes of tensor data in a payload (what the round metrics count; no serialization headers)."""
    return int(sum(np.asarray(v).nbytes for v in payload.values()))


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
    idx = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]).astype(index_dtype)
    return {"idx": idx, "val": flat[idx]}


def _decode(name: str, parts: Mapping[str, np.ndarray], ref: np.ndarray) -> np.ndarray:
    """``ref`` + the delta the parts (keyed by suffix) encode, in ``ref``'s dtype and shape; ValueError
    if malformed."""
    kind = _ENCODINGS.get(frozenset(parts))
    if kind is None or kind == "plain":
        expected = " or ".join("+".join(SEP + s for s in sorted(e)) for e in _ENCODINGS if "" not in e)
        raise ValueError(f"tensor {name!r}: parts {sorted(parts)} do not form one encoding ({expected})")
    if not np.issubdtype(ref.dtype, np.floating):
        raise ValueError(f"tensor {name!r} is compressed but is {ref.dtype} in the global model (only floats are)")
    if kind == "topk":
        return _decode_topk(name, parts["idx"], parts["val"], ref)
    if kind == "fp16":
        delta = parts["fp16"]
        _expect(name, "fp16", delta, np.float16, ref.shape)
    else:
        q, scale = parts["int8"], parts["scale"]
        _expect(name, "int8", q, np.int8, ref.shape)
        if scale.size != 1 or not np.issubdtype(scale.dtype, np.floating):
            raise ValueError(f"tensor {name!r}: {SEP}scale must be one float, got {scale.dtype} of shape {scale.shape}")
        s = float(scale.reshape(-1)[0])
        if not np.isfinite(s) or s < 0:
            raise ValueError(f"tensor {name!r}: {SEP}scale is {s}, must be finite and >= 0")
        delta = q.astype(ref.dtype) * ref.dtype.type(s)
    return np.asarray(ref + delta.astype(ref.dtype), dtype=ref.dtype)


def _decode_topk(name: str, idx: np.ndarray, val: np.ndarray, ref: np.ndarray) -> np.ndarray:
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"tensor {name!r}: {SEP}idx must be a 1-d integer array, got {idx.dtype} of shape {idx.shape}")
    if val.ndim != 1 or not np.issubdtype(val.dtype, np.floating) or val.shape != idx.shape:
        raise ValueError(
            f"tensor {name!r}: {SEP}val must be a 1-d float array as long as {SEP}idx ({idx.size}), "
            f"got {val.dtype} of shape {val.shape}"
        )
    if idx.size and (idx.min() < 0 or idx.max() >= ref.size):
        raise ValueError(f"tensor {name!r}: indices outside [0, {ref.size})")
    if np.unique(idx).size != idx.size:
        raise ValueError(f"tensor {name!r}: repeated indices")
    out = np.array(ref, dtype=ref.dtype, order="C")  # a fresh C-ordered copy: reshape(-1) is a view
    out.reshape(-1)[idx] += val.astype(ref.dtype)
    return out


def _expect(name: str, suffix: str, array: np.ndarray, dtype: type, shape: tuple[int, ...]) -> None:
    if array.dtype != dtype or array.shape != shape:
        raise ValueError(
            f"tensor {name!r}: {SEP}{suffix} must be {np.dtype(dtype)} of shape {shape}, "
            f"got {array.dtype} of shape {array.shape}"
        )

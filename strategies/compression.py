"""Update compression, the server's side: the payload format and how the server restores an update.

Plain numpy, no Flower. A client (``fedapp.client.compression``) sends, instead of its full model, a
payload ``{key: ndarray}``; the lossy methods encode the *delta* (update − the global model the
server sent). Each key is a tensor name, alone or with one suffix:

- ``name``                          the tensor itself, sent whole (method ``none``, integer tensors,
                                    and any tensor a method would not shrink or would corrupt)
- ``name::fp16``                    the delta as float16
- ``name::int8``, ``name::scale``   the delta as int8 ``q`` and a float32 0-d scale: delta ≈ q · scale,
                                    scale = max|delta| / 127 (symmetric, per tensor)
- ``name::idx``, ``name::val``      top-k of the delta plus the error-feedback residual: int32 flat
                                    indices (int64 past 2³¹ elements), sorted, and their values in
                                    the tensor's dtype; every other entry keeps the global value

:func:`decompress` rebuilds the full tensors (a payload of plain names is returned as it is) and
refuses anything malformed; :func:`payload_bytes` is what the round metrics count.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedapp.config.keys import Key, Owner

METHODS = ("none", "fp16", "int8", "topk")
# Clients encode with these keys (fedapp.client.compression), the server decodes what it gets.
KEYS = Owner(
    "update compression",
    keys=(
        Key("compression", "none", "how clients encode their update", choices=METHODS),
        Key(
            "topk-fraction",
            0.01,
            "share of coordinates a topk update keeps",
            low=0.0,
            high=1.0,
            low_open=True,
            when=lambda c: c.compression == "topk",
            needs='compression="topk"',
        ),
    ),
)
SEP = "::"
# The parts each encoding is made of (by key suffix; "" = the plain tensor).
_ENCODINGS = {
    frozenset({""}): "plain",
    frozenset({"fp16"}): "fp16",
    frozenset({"int8", "scale"}): "int8",
    frozenset({"idx", "val"}): "topk",
}
_SUFFIXES = frozenset().union(*_ENCODINGS)


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
        out[name] = decode_tensor(name, tensor_parts, np.asarray(ref))
    return out


def payload_bytes(payload: Mapping[str, np.ndarray]) -> int:
    """Bytes of tensor data in a payload (what the round metrics count; no serialization headers)."""
    return int(sum(np.asarray(v).nbytes for v in payload.values()))


def decode_tensor(name: str, parts: Mapping[str, np.ndarray], ref: np.ndarray) -> np.ndarray:
    """``ref`` + the delta the parts (keyed by suffix) encode, in ``ref``'s dtype and shape; ValueError
    if malformed. (The client decodes with it too, to check that an encoding is faithful.)"""
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

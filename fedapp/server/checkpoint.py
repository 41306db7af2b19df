"""Round checkpoints: the global model as safetensors plus a JSON manifest, written atomically.

A checkpoint is a folder ``checkpoints/round-NNNN/`` holding ``model.safetensors`` and
``manifest.json`` (round, run config, class list, model name, strategy state, metrics so far and
the SHA-256 of the weights file). It is written into a temporary folder and renamed into place, so
a crash mid-write leaves the previous checkpoints intact and never a half checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedapp.files import TEMP_GLOB, atomic_directory, atomic_write_json
from fedapp.server.results import load_weights, save_weights
from fedapp.task.config import AppConfig, parse_config
from fedapp.task.models import build_model

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
CHECKPOINTS_DIR = "checkpoints"
BEST_LINK = "best.json"  # names the best checkpoint folder (a file, not a symlink: portable)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not fit the run that wants to use it."""


@dataclass
class Checkpoint:
    path: Path
    arrays: dict[str, np.ndarray]
    manifest: dict[str, Any]

    @property
    def round(self) -> int:
        return int(self.manifest["round"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def run_config(self) -> dict[str, Any]:
        return dict(self.manifest["run-config"])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def encode_state(state: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Split a strategy state into arrays (stored in the weights file, prefixed) and JSON values."""
    arrays: dict[str, np.ndarray] = {}
    plain: dict[str, Any] = {}
    for name, value in state.items():
        if isinstance(value, Mapping) and value and all(isinstance(v, np.ndarray) for v in value.values()):
            arrays.update({f"__state__/{name}/{k}": v for k, v in value.items()})
            plain[name] = {"__arrays__": list(value)}
        else:
            plain[name] = value
    return arrays, plain


def decode_state(plain: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for name, value in plain.items():
        if isinstance(value, Mapping) and "__arrays__" in value:
            state[name] = {k: arrays[f"__state__/{name}/{k}"] for k in value["__arrays__"]}
        else:
            state[name] = value
    return state


def save_checkpoint(
    run_dir: str | Path,
    server_round: int,
    arrays: Mapping[str, np.ndarray],
    run_config: Mapping[str, Any],
    classes: Sequence[str],
    strategy_state: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
) -> Path:
    """Write ``checkpoints/round-NNNN`` atomically; returns its path."""
    final = Path(run_dir) / CHECKPOINTS_DIR / f"round-{server_round:04d}"
    with atomic_directory(final) as tmp:
        state_arrays, state_plain = encode_state(strategy_state)
        model_name = str(run_config.get("model", ""))
        save_weights(
            tmp / WEIGHTS, {**arrays, **state_arrays}, {"model": model_name, "classes": json.dumps(list(classes))}
        )
        manifest = {
            "round": server_round,
            "model": model_name,
            "classes": list(classes),
            "run-config": dict(run_config),
            "strategy-state": state_plain,
            "history": list(history),
            "weights-sha256": sha256(tmp / WEIGHTS),
        }
        atomic_write_json(tmp / MANIFEST, manifest, indent=1)  # fsync-ed: on disk before the folder's name
    return final


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint folder (or a run folder: its latest checkpoint)."""
    path = Path(path)
    if (path / CHECKPOINTS_DIR).is_dir():
        path = latest_checkpoint(path)
    manifest_path, weights_path = path / MANIFEST, path / WEIGHTS
    if not manifest_path.is_file() or not weights_path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: {MANIFEST} and {WEIGHTS} are required")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path} is corrupt: {exc}") from exc
    if sha256(weights_path) != manifest.get("weights-sha256"):
        raise CheckpointError(f"{weights_path} does not match the hash in its manifest: corrupt or replaced")
    stored = load_weights(weights_path)
    arrays = {k: v for k, v in stored.items() if not k.startswith("__state__/")}
    manifest["strategy-state"] = decode_state(manifest.get("strategy-state", {}), stored)
    return Checkpoint(path, arrays, manifest)


def remove_partial_writes(run_dir: str | Path) -> list[Path]:
    """Delete what a writer killed mid-write left: temp checkpoint folders (``checkpoints/.round-*``)
    and atomic-write temp files (``.NAME.*.tmp``). Only for the folder's one writer (see WriterLock)."""
    run_dir = Path(run_dir)
    found = {
        *run_dir.glob(f"{CHECKPOINTS_DIR}/.round-*"),
        *run_dir.glob(TEMP_GLOB),
        *run_dir.glob(f"{CHECKPOINTS_DIR}/{TEMP_GLOB}"),
    }
    for path in found:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return sorted(found)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS_DIR
    return sorted(p for p in root.glob("round-*") if (p / MANIFEST).is_file()) if root.is_dir() else []


def latest_checkpoint(run_dir: str | Path) -> Path:
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"no checkpoint under {Path(run_dir) / CHECKPOINTS_DIR}")
    return found[-1]


def best_checkpoint(run_dir: str | Path) -> Path | None:
    marker = Path(run_dir) / CHECKPOINTS_DIR / BEST_LINK
    if not marker.is_file():
        return None
    return Path(run_dir) / CHECKPOINTS_DIR / json.loads(marker.read_text())["checkpoint"]


def prune_checkpoints(run_dir: str | Path, keep_last: int, best: Path | None) -> None:
    """Keep the last ``keep_last`` checkpoints and the best one; delete the rest."""
    found = list_checkpoints(run_dir)
    keep = set(found[-keep_last:]) if keep_last > 0 else set()
    if best is not None:
        keep.add(best)
    for path in found:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A checkpoint's manifest alone: cheap (no weights read, no hash), for checks before a start."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: {MANIFEST} and {WEIGHTS} are required")
    try:
        return json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path} is corrupt: {exc}") from exc


def check_resumable(path: str | Path, manifest: Mapping[str, Any], model_name: str, num_server_rounds: int) -> None:
    """Refuse to resume a checkpoint of another model, or one that leaves no round to train. The
    manifest is enough: the launcher checks this before anything starts, the ServerApp again."""
    if manifest.get("model") != model_name:
        raise CheckpointError(f"checkpoint {path} is for model {manifest.get('model')!r}, this run uses {model_name!r}")
    if int(manifest["round"]) >= num_server_rounds:
        raise CheckpointError(
            f"checkpoint {path} is at round {manifest['round']}: num-server-rounds={num_server_rounds} "
            "leaves nothing to train; raise num-server-rounds to continue"
        )


def check_compatible(
    checkpoint: Checkpoint, model_name: str, classes: Sequence[str], reference: Mapping[str, np.ndarray]
) -> None:
    """Refuse a checkpoint of another model, another class list or other tensor shapes."""
    if checkpoint.manifest.get("model") != model_name:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} is for model {checkpoint.manifest.get('model')!r}, "
            f"this run uses {model_name!r}"
        )
    if checkpoint.classes != list(classes):
        raise CheckpointError(
            f"checkpoint {checkpoint.path} has other classes ({len(checkpoint.classes)}) "
            f"than this dataset ({len(classes)})"
        )
    unexpected = [key for key in checkpoint.arrays if key not in reference]
    if unexpected:
        raise CheckpointError(f"checkpoint {checkpoint.path} has tensors this model does not: {unexpected[:5]}")
    for key, value in reference.items():
        got = checkpoint.arrays.get(key)
        if got is None or got.shape != value.shape or got.dtype != value.dtype:
            raise CheckpointError(f"checkpoint {checkpoint.path}: tensor {key!r} is missing or has another shape/dtype")


def mark_best(run_dir: str | Path, checkpoint: Path, metric: float) -> None:
    atomic_write_json(Path(run_dir) / CHECKPOINTS_DIR / BEST_LINK, {"checkpoint": checkpoint.name, "metric": metric})


def model_from_checkpoint(
    path: str | Path, site: int | None = None, state_dir: str | Path | None = None
) -> tuple[torch.nn.Module, list[str], AppConfig]:
    """The classifier stored in a checkpoint (or a run folder's best, else latest), in eval mode,
    with its class list and the run config it was trained with (clip settings included).

    ``site``: that site's personal model instead (a personalized run): the run folder's latest
    checkpoint (or the one named) with the site's newest personal state at or before its round, read
    from ``state_dir`` (a SuperNode's own) or where the run kept it (``fedapp.client.personal``)."""
    path = Path(path)
    if (path / CHECKPOINTS_DIR).is_dir():
        path = latest_checkpoint(path) if site is not None else best_checkpoint(path) or latest_checkpoint(path)
    checkpoint = load_checkpoint(path)
    cfg = parse_config(checkpoint.run_config, check_paths=False)
    arrays = checkpoint.arrays
    if site is not None:
        from fedapp.client.personal import site_model_arrays

        arrays = site_model_arrays(arrays, cfg, checkpoint.path.parent.parent, checkpoint.round, site, state_dir)
    model = build_model(cfg.model, len(checkpoint.classes), pooling=cfg.pooling)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()}, strict=True)
    return model.eval(), checkpoint.classes, cfg

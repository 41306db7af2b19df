"""Find the videos of a folder most similar to a query video (cosine similarity of embeddings).

    fedvideo retrieve CHECKPOINT --index-dir DIR --videos FOLDER --query VIDEO [--top-k 5] [--json]

Embeddings are the classifier's backbone features averaged over a video's evaluation clips and
L2-normalized (:func:`fedapp.tools.inference.embed_video`). The folder's embeddings are kept in
``DIR/embeddings.npy`` with ``DIR/index.json`` (video paths, the checkpoint's weights SHA-256, the
clip settings and the folder's file list with sizes and mtimes). The index is reused while all of
those match and rebuilt otherwise. Exit status: 0 on success, 1 when the query video cannot be
read, 2 when the checkpoint cannot be loaded or the folder holds no readable video.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from datasets.layouts import VIDEO_EXTENSIONS, list_videos
from fedapp.files import atomic_write_bytes, atomic_write_json

# torch, PyAV and the checkpoint code are imported where they are used, so that
# `fedvideo retrieve --help` answers without loading them (seconds on a busy machine).
if TYPE_CHECKING:
    from torch import nn

    from fedapp.task.config import AppConfig

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
EMBEDDINGS_FILE = "embeddings.npy"
INDEX_FILE = "index.json"


class RetrievalError(ValueError):
    """The folder cannot be indexed (no readable video) or an embedding does not fit the index."""


@dataclass
class Index:
    """Embeddings of a folder's videos: row i of ``embeddings`` belongs to ``paths[i]``."""

    paths: list[str]
    embeddings: np.ndarray  # N×F float32, rows L2-normalized
    fingerprint: dict[str, Any]
    failed: list[dict[str, str]] = field(default_factory=list)
    rebuilt: bool = False  # True when this call computed the embeddings, False when reused


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder that :func:`model_from_checkpoint` loads for ``path``."""
    from fedapp.server.checkpoint import CHECKPOINTS_DIR, best_checkpoint, latest_checkpoint

    path = Path(path)
    if (path / CHECKPOINTS_DIR).is_dir():
        return best_checkpoint(path) or latest_checkpoint(path)
    return path


def checkpoint_hash(checkpoint_dir: str | Path) -> str:
    """The weights SHA-256 recorded in a checkpoint's manifest (loading verifies it against the file)."""
    from fedapp.server.checkpoint import MANIFEST, CheckpointError

    manifest_path = Path(checkpoint_dir) / MANIFEST
    try:
        return str(json.loads(manifest_path.read_text())["weights-sha256"])
    except (OSError, json.JSONDecodeError, KeyError) as error:
        raise CheckpointError(f"cannot read the weights hash from {manifest_path}: {error}") from error


def clip_settings(cfg: AppConfig) -> dict[str, Any]:
    """Every setting that changes an embedding besides the weights."""
    return {
        "clip-len": cfg.clip_len,
        "clip-stride": cfg.clip_stride,
        "resize": cfg.resize,
        "crop-size": cfg.crop_size,
        "eval-clips": cfg.eval_clips,
        "normalization": [list(values) for values in cfg.normalization],
    }


def folder_fingerprint(folder: str | Path, cfg: AppConfig, checkpoint_sha256: str) -> dict[str, Any]:
    """What the index depends on: weights, clip settings, and the folder's files with sizes and mtimes."""
    folder = Path(folder).resolve()
    files = []
    for path in list_videos(folder):
        stat = path.stat()
        files.append([path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns])
    return {
        "version": INDEX_VERSION,
        "checkpoint-sha256": checkpoint_sha256,
        "clip-settings": clip_settings(cfg),
        "folder": str(folder),
        "files": files,
    }


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def build_index(
    model: nn.Module, cfg: AppConfig, folder: str | Path, index_dir: str | Path, checkpoint_hash: str
) -> Index:
    """Embed every video of ``folder`` and write the index under ``index_dir``.

    Unreadable videos are skipped and listed in ``failed``. Raises RetrievalError when no video
    could be embedded.
    """
    from datasets.video_io import VideoDecodeError
    from fedapp.tools.inference import embed_video

    folder, index_dir = Path(folder).resolve(), Path(index_dir)
    fingerprint = folder_fingerprint(folder, cfg, checkpoint_hash)
    relative, rows, failed = [], [], []
    for name, _, _ in fingerprint["files"]:
        try:
            rows.append(embed_video(model, folder / name, cfg))
            relative.append(name)
        except VideoDecodeError as error:
            logger.warning("not indexed: %s", error)
            failed.append({"video": name, "error": str(error)})
    if not rows:
        raise RetrievalError(f"no readable video ({', '.join(VIDEO_EXTENSIONS)}) in {folder}")
    embeddings = np.stack(rows).astype(np.float32)
    data = _npy_bytes(embeddings)
    # Embeddings first, the JSON last: the JSON names the embeddings' hash, so a crash or a
    # concurrent build between the two writes leaves a pair that fails the check and gets rebuilt.
    atomic_write_bytes(index_dir / EMBEDDINGS_FILE, data)
    atomic_write_json(
        index_dir / INDEX_FILE,
        {**fingerprint, "paths": relative, "failed": failed, "embeddings-sha256": hashlib.sha256(data).hexdigest()},
    )
    logger.info("indexed %d videos of %s (%d unreadable)", len(rows), folder, len(failed))
    return Index([str(folder / name) for name in relative], embeddings, fingerprint, failed, rebuilt=True)


def load_index(index_dir: str | Path) -> Index | None:
    """The index stored under ``index_dir``, or None when absent, incomplete or corrupt."""
    index_dir = Path(index_dir)
    try:
        meta = json.loads((index_dir / INDEX_FILE).read_text())
        data = (index_dir / EMBEDDINGS_FILE).read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["embeddings-sha256"]:
            logger.info("index in %s is inconsistent (embeddings changed): rebuilding", index_dir)
            return None
        embeddings = np.load(io.BytesIO(data), allow_pickle=False)
        paths = [str(Path(meta["folder"]) / name) for name in meta["paths"]]
        fingerprint = {key: meta[key] for key in ("version", "checkpoint-sha256", "clip-settings", "folder", "files")}
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.info("no usable index in %s (%s)", index_dir, error)
        return None
    if embeddings.ndim != 2 or len(embeddings) != len(paths):
        return None
    return Index(paths, embeddings, fingerprint, list(meta.get("failed", [])), rebuilt=False)


def load_or_build_index(
    model: nn.Module, cfg: AppConfig, folder: str | Path, index_dir: str | Path, checkpoint_hash: str
) -> Index:
    """The stored index when it matches the checkpoint, clip settings and folder contents; else a new one."""
    stored = load_index(index_dir)
    if stored is not None and stored.fingerprint == folder_fingerprint(folder, cfg, checkpoint_hash):
        logger.info("reusing index in %s (%d videos)", index_dir, len(stored.paths))
        return stored
    return build_index(model, cfg, folder, index_dir, checkpoint_hash)


def query(index: Index, embedding: np.ndarray, top_k: int = 5) -> list[dict[str, Any]]:
    """The ``top_k`` indexed videos most similar to ``embedding``: ``[{"video", "score"}, ...]``, best first.

    Both sides are L2-normalized, so the dot product is the cosine similarity.
    """
    embedding = np.asarray(embedding, dtype=np.float32).reshape(-1)
    if embedding.shape[0] != index.embeddings.shape[1]:
        raise RetrievalError(f"embedding has {embedding.shape[0]} values, the index {index.embeddings.shape[1]}")
    embedding = embedding / max(float(np.linalg.norm(embedding)), 1e-12)
    scores = index.embeddings @ embedding
    order = np.argsort(-scores, kind="stable")[: max(top_k, 0)]
    return [{"video": index.paths[i], "score": float(scores[i])} for i in order]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedvideo retrieve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder or run folder")
    parser.add_argument("--index-dir", type=Path, required=True, help="where the folder's index is kept")
    parser.add_argument("--videos", type=Path, required=True, help="folder of videos to search")
    parser.add_argument("--query", required=True, help="the query video")
    parser.add_argument("--top-k", type=int, default=5, help="results shown (default 5)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    if not args.videos.is_dir():
        parser.error(f"--videos {args.videos} is not a folder")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from datasets.video_io import VideoDecodeError
    from fedapp.server.checkpoint import CheckpointError, model_from_checkpoint
    from fedapp.task.config import ConfigError
    from fedapp.task.models import ModelError
    from fedapp.tools.inference import embed_video

    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
        weights_hash = checkpoint_hash(checkpoint)
        model, _, cfg = model_from_checkpoint(checkpoint)
        if not callable(getattr(model, "features", None)):  # a model of your own without penultimate features
            raise RetrievalError(
                f"model={cfg.model!r} has no features(clips) method giving the head's inputs: retrieval needs "
                "one (the built-in models have it); add it to your model to search videos with it"
            )
        index = load_or_build_index(model, cfg, args.videos, args.index_dir, weights_hash)
    except (CheckpointError, ConfigError, ModelError, RetrievalError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        results = query(index, embed_video(model, args.query, cfg), args.top_k)
    except VideoDecodeError as error:
        print(f"cannot read the query video: {error}", file=sys.stderr)
        return 1

    if args.json:
        report = {
            "query": args.query,
            "index": {
                "dir": str(args.index_dir),
                "rebuilt": index.rebuilt,
                "videos": len(index.paths),
                "failed": index.failed,
            },
            "results": results,
        }
        print(json.dumps(report, indent=2))
    else:
        state = "built" if index.rebuilt else "reused"
        print(f"index {state}: {len(index.paths)} videos ({len(index.failed)} unreadable) in {args.index_dir}")
        for rank, item in enumerate(results, start=1):
            print(f"{rank:>3}. {item['score']:.4f}  {item['video']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Inference on single videos with a trained classifier: multi-clip prediction and embeddings.

A video is cut exactly as evaluation cuts it (``eval-clips`` uniformly spaced clips, decoded at the
checkpoint's ``resize``, centre-cropped and normalized by :class:`EvalClipTransform`), so a
prediction here equals the video-level prediction that evaluation scored.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from datasets.transforms import EvalClipTransform
from datasets.video_io import clip_frame_indices, decode_frames, probe_video, uniform_clip_starts
from fedapp.task.config import AppConfig

logger = logging.getLogger(__name__)


def video_clips(path: str | Path, cfg: AppConfig) -> torch.Tensor:
    """The ``cfg.eval_clips`` evaluation clips of one video as float32 ``N×C×T×H×W``.

    Raises :class:`datasets.video_io.VideoDecodeError` for an unreadable file.
    """
    spec = cfg.clip_spec
    num_frames = probe_video(path).num_frames
    starts = uniform_clip_starts(num_frames, spec.clip_len, spec.stride, cfg.eval_clips)
    per_clip = [clip_frame_indices(num_frames, spec.clip_len, spec.stride, start) for start in starts]
    # One decoding pass for all clips (they may overlap); the frames are identical to decoding
    # each clip on its own, as the evaluation dataset does.
    wanted = sorted({i for indices in per_clip for i in indices})
    frames = decode_frames(path, wanted, spec.resize)
    row = {index: n for n, index in enumerate(wanted)}
    transform = EvalClipTransform(spec.crop_size, *cfg.normalization)
    return torch.stack([transform(frames[[row[i] for i in indices]]) for indices in per_clip])


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.inference_mode()
def video_probabilities(model: nn.Module, clips: torch.Tensor) -> torch.Tensor:
    """Class probabilities of one video: the softmax of each clip, averaged over its clips."""
    model.eval()
    logits = model(clips.to(_model_device(model))).float()
    return logits.softmax(dim=1).mean(dim=0).cpu()


def top_labels(probs: torch.Tensor, classes: list[str], top_k: int = 5) -> list[dict[str, Any]]:
    """The ``top_k`` most probable classes, most probable first."""
    values, indices = probs.topk(min(max(top_k, 1), len(classes)))
    return [{"label": classes[i], "probability": float(p)} for p, i in zip(values.tolist(), indices.tolist())]


def predict_video(
    model: nn.Module, path: str | Path, cfg: AppConfig, classes: list[str], top_k: int = 5
) -> dict[str, Any]:
    """Top-k classes of one video, ``{"video": path, "top": [{"label", "probability"}, ...]}``.

    Raises VideoDecodeError for an unreadable file.
    """
    probs = video_probabilities(model, video_clips(path, cfg))
    return {"video": str(path), "top": top_labels(probs, classes, top_k)}


@torch.inference_mode()
def embed_video(model: nn.Module, path: str | Path, cfg: AppConfig) -> np.ndarray:
    """L2-normalized float32 embedding of one video: backbone features averaged over its clips.

    These are the head's inputs (penultimate features), so videos the classifier finds alike are
    close even across classes it was never trained on. Raises VideoDecodeError.
    """
    model.eval()
    features = model.features(video_clips(path, cfg).to(_model_device(model))).float().mean(dim=0)
    return torch.nn.functional.normalize(features, dim=0).cpu().numpy().astype(np.float32)

"""The local training loop and evaluation (clip-level and video-level accuracy)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fedapp.task.config import AppConfig
from fedapp.task.devices import autocast_context, input_to_device

logger = logging.getLogger(__name__)

# A progress line at most this often (and at each epoch's end): a long epoch shows it is moving,
# a short one does not flood the log.
PROGRESS_INTERVAL_S = 15.0


def make_optimizer(model: nn.Module, cfg: AppConfig) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable parameters (a frozen backbone is skipped)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_epochs(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    device: torch.device,
    bf16: bool = False,
    channels_last: bool = False,
    log_prefix: str = "",
    proximal_mu: float = 0.0,
    gradient_correction: Mapping[str, torch.Tensor] | None = None,
    proximal_anchor: Mapping[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Train for ``epochs`` passes; returns mean loss, accuracy, clips, optimizer steps, clips/s
    and failed clips.

    ``proximal_mu`` > 0 adds FedProx's ``mu/2 · ||w - w_start||²`` (w_start: the weights the round
    began with, or ``proximal_anchor`` by parameter name: Ditto pulls a personal model towards the
    global one), which keeps local models near the global one under non-IID data.
    ``gradient_correction`` (parameter name → tensor) is added to each named parameter's gradient
    before every step: SCAFFOLD's ``c − cᵢ``.
    """
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    corrections = [
        (p, gradient_correction[name].to(p.device, p.dtype))
        for name, p in model.named_parameters()
        if p.requires_grad and gradient_correction is not None and name in gradient_correction
    ]
    steps = 0
    anchor: list[torch.Tensor] = []
    if proximal_mu > 0:
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        anchor = [
            p.detach().clone()
            if proximal_anchor is None
            else torch.as_tensor(proximal_anchor[name]).to(p.device, p.dtype)
            for name, p in named
        ]
    seen = correct = failed = 0
    loss_sum = 0.0
    start = last_log = time.perf_counter()
    for epoch in range(epochs):
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        for step, (clips, labels, _, bad) in enumerate(loader, start=1):
            failed += len(bad)
            _mark_reported(loader, bad)
            if clips is None:
                continue
            clips = input_to_device(clips, device, channels_last)
            labels = labels.to(device, non_blocking=True)
            with autocast_context(device, bf16):
                logits = model(clips)
                ce_loss = F.cross_entropy(logits.float(), labels)
            loss = ce_loss
            if anchor:
                loss = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(trainable, anchor))
            step_with(optimizer, loss, corrections)
            steps += 1
            seen += labels.numel()
            loss_sum += ce_loss.item() * labels.numel()
            correct += (logits.argmax(1) == labels).sum().item()
            if step == len(loader) or time.perf_counter() - last_log > PROGRESS_INTERVAL_S:
                last_log = time.perf_counter()
                where = f"epoch {epoch + 1}/{epochs} step {step}/{len(loader)}"
                # debug: the console's progress is the server's one line per round
                logger.debug("%s%s loss %.4f", log_prefix, where, ce_loss.item())
    seconds = time.perf_counter() - start
    clips_per_s = seen / seconds if seconds > 0 else 0.0
    return {"train-loss": loss_sum / max(seen, 1), "train-accuracy": correct / max(seen, 1), "train-clips": float(seen),
            "train-steps": float(steps), "clips-per-s": clips_per_s, "failed-clips": float(failed)}  # fmt: skip


def step_with(
    optimizer: torch.optim.Optimizer, loss: torch.Tensor, corrections: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """One optimizer step on ``loss``, each gradient corrected first (SCAFFOLD's ``c − cᵢ``)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for p, correction in corrections:
        if p.grad is not None:
            p.grad.add_(correction)
    optimizer.step()


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    bf16: bool = False,
    channels_last: bool = False,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Clip-level and video-level scores; a video's prediction averages its clips' softmax.

    With ``num_classes``, also the video-level confusion matrix (rows: true class) as lists.
    """
    model.eval()
    loss_sum = 0.0
    clips_seen = clip_correct = failed = 0
    video_probs: dict[int, torch.Tensor] = {}
    video_labels: dict[int, int] = {}
    for clips, labels, video_ids, bad in loader:
        failed += len(bad)
        _mark_reported(loader, bad)
        if clips is None:
            continue
        clips = input_to_device(clips, device, channels_last)
        labels = labels.to(device)
        with autocast_context(device, bf16):
            logits = model(clips).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        clip_correct += (logits.argmax(1) == labels).sum().item()
        clips_seen += labels.numel()
        probs = logits.softmax(1).cpu()
        for prob, label, vid in zip(probs, labels.tolist(), video_ids.tolist()):
            video_probs[vid] = video_probs.get(vid, 0) + prob
            video_labels[vid] = label
    video_correct = sum(int(video_probs[v].argmax().item() == video_labels[v]) for v in video_probs)
    extra: dict[str, Any] = {}
    if num_classes is not None:
        confusion = [[0] * num_classes for _ in range(num_classes)]
        for vid, probs in video_probs.items():
            confusion[video_labels[vid]][int(probs.argmax())] += 1
        extra["confusion"] = confusion
    return {
        **extra,
        "loss": loss_sum / max(clips_seen, 1),
        "clip-accuracy": clip_correct / max(clips_seen, 1),
        "video-accuracy": video_correct / max(len(video_probs), 1),
        "num-clips": float(clips_seen),
        "num-videos": float(len(video_probs)),
        "failed-clips": float(failed),
    }


def _mark_reported(loader: DataLoader, failed: list[int]) -> None:
    """Tell the dataset which files failed (warned about in a DataLoader worker, whose memory of it
    dies with the worker), so the next epoch's workers do not warn about them again."""
    if failed and hasattr(loader.dataset, "mark_reported"):
        loader.dataset.mark_reported(failed)


def set_torch_threads(threads: int) -> None:
    """Pin intra-op threads (0 keeps torch's default) so concurrent clients don't oversubscribe cores."""
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def set_deterministic(on: bool) -> None:
    """torch's deterministic algorithms for ``deterministic=true``; CUDA's cuBLAS needs a fixed
    workspace for them, set before its first use. warn_only: an op with no deterministic kernel (some
    CUDA backward passes) warns instead of failing the round, and that run may not repeat to the bit."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.are_deterministic_algorithms_enabled() != on:
        torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.benchmark = False if on else torch.backends.cudnn.benchmark


def state_arrays(model: nn.Module) -> list:
    """The model's state as numpy arrays, in ``state_dict`` order."""
    return [t.detach().cpu().numpy() for t in model.state_dict().values()]


def load_named_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load ``{state_dict name: array}`` strictly: every name must match, every shape must fit."""
    missing = [k for k in model.state_dict() if k not in arrays]
    unexpected = [k for k in arrays if k not in model.state_dict()]
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict({k: torch.as_tensor(a) for k, a in arrays.items()}, strict=True)

"""The teachers' ensemble and the student's distance to it, for FedDF (``strategies.distillation``):
how clips reach the models (:class:`Placement`), the weighted mean of the teachers' logits, and
the temperature-scaled KL divergence of a student to it."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _plain_copy(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device)


def _no_autocast(device: torch.device) -> AbstractContextManager:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Placement:
    """How clips reach the models: ``to_device(batch, device)`` copies a batch, ``autocast(device)``
    wraps each forward pass. Passed in, so this module needs nothing of the app: the server gives
    its own device helpers (``fedapp.task.devices``: channels-last, bf16); the default is a plain
    fp32 copy."""

    to_device: Callable[[torch.Tensor, torch.device], torch.Tensor] = _plain_copy
    autocast: Callable[[torch.device], AbstractContextManager] = _no_autocast


PLAIN = Placement()


def _normalized_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} teachers")
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"teacher weights must be finite, >= 0 and not all zero, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


@torch.no_grad()
def ensemble_logits(
    teachers: Sequence[nn.Module],
    clips: torch.Tensor,
    weights: Sequence[float] | None = None,
    placement: Placement = PLAIN,
) -> torch.Tensor:
    """(Weighted) mean of the teachers' logits on ``clips``, as float32.

    Teachers are switched to eval mode (and left there): the ensemble is the client models as they
    would predict, with their own BatchNorm statistics. ``clips`` must be on the teachers' device.
    """
    if not teachers:
        raise ValueError("ensemble_logits needs at least one teacher")
    total: torch.Tensor | None = None
    for teacher, weight in zip(teachers, _normalized_weights(weights, len(teachers))):
        teacher.eval()
        with placement.autocast(clips.device):
            logits = teacher(clips).float()
        total = weight * logits if total is None else total + weight * logits
    return total


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, reduction: str):
    """KL(softmax(teacher/T) || softmax(student/T)) · T², so gradients keep their scale across T (Hinton et al.)."""
    kl = F.kl_div(
        F.log_softmax(student_logits.float() / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction=reduction,
        log_target=True,
    )
    return kl * temperature**2


@torch.no_grad()
def mean_kl(
    student: nn.Module,
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    temperature: float,
    device: torch.device,
    placement: Placement,
) -> float:
    """Per-clip mean KL of the student (eval mode) to the precomputed ensemble logits."""
    student.eval()
    total = 0.0
    count = 0
    for clips, target in pairs:
        with placement.autocast(device):
            logits = student(placement.to_device(clips, device))
        total += kl_to_teacher(logits, target, temperature, "sum").item()
        count += len(clips)
    return total / count

"""FedDF-style ensemble distillation (Lin et al., 2020) for server-side model fusion.

The fused model starts from the weighted average of the client models and is then trained to
match the averaged logits of the client models (the ensemble) on unlabeled server-side clips,
within a step budget, with early stopping on a held-out share of those clips.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from strategies.ensemble import PLAIN, Placement, ensemble_logits, kl_to_teacher, mean_kl

__all__ = ["PLAIN", "DistillConfig", "Placement", "distill", "distill_arrays", "ensemble_logits"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    """Distillation budget and early-stopping settings (Adam on the student)."""

    steps: int = 200  # step budget
    lr: float = 1e-3
    temperature: float = 1.0
    patience: int = 20  # evaluations without a min_delta improvement of the validation KL before stopping
    min_delta: float = 1e-4
    eval_every: int = 10  # steps between validation evaluations
    val_fraction: float = 0.2  # share of unlabeled batches held out for early stopping (at least 1 batch)

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be {rule}, got {getattr(self, name)!r}"
            for name, ok, rule in (
                ("steps", self.steps >= 0, ">= 0"),
                ("lr", math.isfinite(self.lr) and self.lr >= 0, "finite and >= 0"),
                ("temperature", math.isfinite(self.temperature) and self.temperature > 0, "finite and > 0"),
                ("patience", self.patience >= 1, ">= 1"),
                ("min_delta", self.min_delta >= 0, ">= 0"),
                ("eval_every", self.eval_every >= 1, ">= 1"),
                ("val_fraction", 0 <= self.val_fraction < 1, "in [0, 1)"),
            )
            if not ok
        ]
        if problems:
            raise ValueError("bad DistillConfig: " + "; ".join(problems))


def _usable_clips(batches: Iterable) -> list[torch.Tensor]:
    """The non-empty clip tensors of ``batches``: tensors, or collate_clips tuples whose first item may be None."""
    clips_list = []
    for number, batch in enumerate(batches):
        clips = batch[0] if isinstance(batch, (tuple, list)) else batch
        if clips is None:  # every clip of that batch failed to decode
            continue
        if not isinstance(clips, torch.Tensor):
            raise TypeError(f"batch {number}: expected a clip tensor or a tuple starting with one, got {type(clips)}")
        if len(clips):
            clips_list.append(clips)
    if not clips_list:
        raise ValueError(
            "no usable unlabeled batch for distillation: the iterable was empty or every clip failed to decode"
        )
    return clips_list


def _split_indices(count: int, val_fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) batch indices; val batches are spread evenly, not taken from one end.

    Spreading matters when the unlabeled loader is not shuffled (e.g. clips sorted by video or
    class): a tail split would validate on a different distribution than it trains on. A single
    batch serves as both train and validation set.
    """
    if count == 1:
        return [0], [0]
    n_val = min(max(1, round(val_fraction * count)), count - 1)
    val = sorted({int((i + 0.5) * count / n_val) for i in range(n_val)})
    val_set = set(val)
    return [i for i in range(count) if i not in val_set], val


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    # buffers too: train-mode BatchNorm moves running statistics even when no step helps
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _train(
    student: nn.Module,
    train_pairs: list[tuple[torch.Tensor, torch.Tensor]],
    val_kl: Callable[[], float],
    initial: float,
    config: DistillConfig,
    device: torch.device,
    placement: Placement,
) -> tuple[int, float, int, dict[str, torch.Tensor], bool]:
    """Adam steps on the student towards the ensemble with early stopping on the validation KL;
    ``(steps, best val KL, its step, the best state, stopped early)``."""
    best = progress_ref = initial
    best_state = _snapshot(student)
    best_step = step = stale = 0
    stopped_early = False
    params = [p for p in student.parameters() if p.requires_grad]
    if config.steps and not params:
        raise ValueError("the student has no trainable parameters to distil into")
    optimizer = torch.optim.Adam(params, lr=config.lr) if config.steps else None
    for clips, target in itertools.islice(itertools.cycle(train_pairs), config.steps):
        student.train()
        with placement.autocast(device):
            logits = student(placement.to_device(clips, device))
        loss = kl_to_teacher(logits, target, config.temperature, "batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % config.eval_every and step != config.steps:
            continue
        current = val_kl()
        logger.debug("distill step %d/%d: train KL %.5f, val KL %.5f", step, config.steps, loss.item(), current)
        # the best state is any strict improvement; patience only resets on a min_delta one
        if current < best:
            best, best_step, best_state = current, step, _snapshot(student)
        if current < progress_ref - config.min_delta:
            progress_ref, stale = current, 0
        else:
            stale += 1
            if stale >= config.patience:
                stopped_early = step < config.steps
                break
    return step, best, best_step, best_state, stopped_early


def distill(
    student: nn.Module,
    teachers: Sequence[nn.Module],
    batches: Iterable,
    config: DistillConfig,
    device: torch.device,
    weights: Sequence[float] | None = None,
    *,
    placement: Placement = PLAIN,
) -> dict:
    """Distil the teachers' ensemble into ``student`` in place; returns a summary.

    ``batches`` yields clip tensors ``B×C×T×H×W`` or tuples whose first item is such a tensor or
    None (``collate_clips`` output; labels are ignored). They are materialized once and split into
    train / validation batches; the teachers' ensemble logits are computed once per batch.

    The student trains in train mode, as FedDF does: its BatchNorm statistics are re-estimated on
    the server clips together with the weights. Validation uses eval mode, i.e. the model as it
    will be deployed. The validation KL is measured before any step (the weighted-average starting
    point) and every ``eval_every`` steps; the best state seen (buffers included) is restored at
    the end, so the student never comes back worse than its start on the validation batches, and
    comes back unchanged when the start is the best. The student is left in eval mode; student
    and teachers are moved to ``device``.

    Returns ``steps`` (optimizer steps taken), ``stopped-early``, ``initial-val-kl``,
    ``best-val-kl``, ``final-train-kl`` (the returned student on the train batches, eval mode)
    and ``best-step`` (0 when the starting point was kept).
    """
    clips_list = _usable_clips(batches)
    student.to(device)
    for teacher in teachers:
        teacher.to(device)
    pairs = [
        (clips, ensemble_logits(teachers, placement.to_device(clips, device), weights, placement))
        for clips in clips_list
    ]
    train_idx, val_idx = _split_indices(len(pairs), config.val_fraction)
    train_pairs = [pairs[i] for i in train_idx]
    val_pairs = [pairs[i] for i in val_idx]

    def val_kl() -> float:
        return mean_kl(student, val_pairs, config.temperature, device, placement)

    initial = val_kl()
    step, best, best_step, best_state, stopped_early = _train(student, train_pairs, val_kl, initial, config,
                                                              device, placement)  # fmt: skip
    student.load_state_dict(best_state)
    final_train = mean_kl(student, train_pairs, config.temperature, device, placement)
    logger.info(
        "distillation: %d/%d steps%s, val KL %.5f -> %.5f (best at step %d), train KL %.5f, %d train / %d val batches",
        step, config.steps, " (stopped early)" if stopped_early else "", initial, best, best_step, final_train,
        len(train_pairs), len(val_pairs),
    )  # fmt: skip
    return {
        "steps": step,
        "stopped-early": stopped_early,
        "initial-val-kl": initial,
        "best-val-kl": best,
        "final-train-kl": final_train,
        "best-step": best_step,
    }


def _module_from_arrays(build: Callable[[], nn.Module], arrays: Mapping[str, np.ndarray]) -> nn.Module:
    module = build()
    # torch.tensor copies: read-only numpy buffers (e.g. deserialized messages) cannot be shared
    module.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in arrays.items()}, strict=True)
    return module


def distill_arrays(
    student_arrays: Mapping[str, np.ndarray],
    teacher_arrays: Sequence[Mapping[str, np.ndarray]],
    build: Callable[[], nn.Module],
    batches: Iterable,
    config: DistillConfig,
    device: torch.device,
    weights: Sequence[float] | None = None,
    *,
    placement: Placement = PLAIN,
) -> tuple[dict[str, np.ndarray], dict]:
    """:func:`distill` on numpy models: returns the distilled student as arrays (state_dict key order) and the summary.

    ``build()`` must create the architecture the arrays belong to (loaded strictly). Each output
    array keeps the dtype and shape of the corresponding input (int64 ``num_batches_tracked`` stays
    a 0-d int64).
    """
    student = _module_from_arrays(build, student_arrays)
    teachers = [_module_from_arrays(build, arrays) for arrays in teacher_arrays]
    summary = distill(student, teachers, batches, config, device, weights, placement=placement)
    out = {
        key: np.asarray(value.detach().cpu().numpy(), dtype=np.asarray(student_arrays[key]).dtype)
        for key, value in student.state_dict().items()
    }
    return out, summary

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from datasets.clip_dataset import collate_clips
from fedapp.task.models import build_model
from strategies.distillation import (
    DistillConfig,
    _split_indices,
    distill,
    distill_arrays,
    ensemble_logits,
)

CPU = torch.device("cpu")
CLIP_SHAPE = (3, 4, 16, 16)
NUM_CLASSES = 4


class PooledLinear(nn.Module):
    """Channel means -> linear: a B×C×T×H×W -> B×K classifier small enough to distil in a few steps."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.head = nn.Linear(CLIP_SHAPE[0], NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3, 4)))


def make_clips(batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # a per-clip colour offset so the pooled features vary across clips, not only the noise
    offsets = 2 * torch.randn(batch, CLIP_SHAPE[0], 1, 1, 1, generator=gen)
    return offsets + 0.1 * torch.randn(batch, *CLIP_SHAPE, generator=gen)


def make_batches(count: int, batch: int = 8, seed: int = 0) -> list[torch.Tensor]:
    return [make_clips(batch, seed + i) for i in range(count)]


def tiny3d(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("tiny3d", num_classes=NUM_CLASSES)


def mean_kl(student: nn.Module, target: torch.Tensor, clips: torch.Tensor) -> float:
    student.eval()
    with torch.no_grad():
        log_s = F.log_softmax(student(clips), dim=1)
    return F.kl_div(log_s, F.log_softmax(target, dim=1), reduction="batchmean", log_target=True).item()


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_ensemble_logits_is_the_plain_and_the_weighted_mean():
    teachers = [PooledLinear(seed) for seed in (1, 2, 3)]
    clips = make_clips(5, seed=7)
    with torch.no_grad():
        each = torch.stack([t(clips) for t in teachers])
    torch.testing.assert_close(ensemble_logits(teachers, clips), each.mean(0))
    weights = [1.0, 2.0, 5.0]
    expected = (each * torch.tensor(weights).view(3, 1, 1)).sum(0) / sum(weights)
    torch.testing.assert_close(ensemble_logits(teachers, clips, weights), expected)
    with pytest.raises(ValueError, match="weights"):
        ensemble_logits(teachers, clips, [1.0, 2.0])
    with pytest.raises(ValueError, match="weights"):
        ensemble_logits(teachers, clips, [0.0, 0.0, 0.0])


def test_ensemble_logits_puts_teachers_in_eval_mode():
    teachers = [tiny3d(seed) for seed in (1, 2)]
    clips = torch.randn(2, *CLIP_SHAPE)
    out = ensemble_logits(teachers, clips)  # train-mode BatchNorm would also update running stats
    assert not any(t.training for t in teachers)
    assert out.shape == (2, NUM_CLASSES) and not out.requires_grad


def test_distillation_moves_the_student_towards_the_ensemble():
    teachers = [PooledLinear(seed) for seed in (1, 2, 3)]
    student = PooledLinear(0)
    weights = [1.0, 2.0, 3.0]
    batches = make_batches(10)
    clips = torch.cat(batches)
    target = ensemble_logits(teachers, clips, weights)

    def agreement() -> float:
        with torch.no_grad():
            return (student(clips).argmax(1) == target.argmax(1)).float().mean().item()

    before_kl, before_agree = mean_kl(student, target, clips), agreement()
    config = DistillConfig(steps=100, lr=0.1, eval_every=10, patience=30)
    result = distill(student, teachers, batches, config, CPU, weights)

    assert result["initial-val-kl"] > 0.05
    assert result["best-val-kl"] < 0.1 * result["initial-val-kl"]
    assert result["final-train-kl"] < 0.1 * result["initial-val-kl"]
    assert result["best-step"] > 0
    assert mean_kl(student, target, clips) < 0.1 * before_kl
    assert agreement() > before_agree and agreement() >= 0.9


def test_a_student_that_already_is_the_ensemble_comes_back_unchanged():
    teacher = tiny3d(1)
    teachers = [copy.deepcopy(teacher) for _ in range(3)]
    student = copy.deepcopy(teacher)
    batches = [torch.randn(2, *CLIP_SHAPE) for _ in range(2)]
    config = DistillConfig(steps=2, lr=1e-2, eval_every=1)
    result = distill(student, teachers, batches, config, CPU)

    assert result["initial-val-kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["best-step"] == 0 and result["steps"] == 2
    # train-mode BatchNorm moved weights and running stats during the steps; the start is restored
    assert states_equal(student, teacher)
    assert not student.training


def test_no_progress_stops_early():
    teachers = [PooledLinear(seed) for seed in (1, 2)]
    student = PooledLinear(0)
    start = copy.deepcopy(student)
    config = DistillConfig(steps=100, lr=0.0, patience=3, eval_every=2)
    result = distill(student, teachers, make_batches(4), config, CPU)

    assert result["stopped-early"] is True
    assert result["steps"] == 6  # three evaluations without improvement, two steps apart
    assert result["best-val-kl"] == result["initial-val-kl"] and result["best-step"] == 0
    assert states_equal(student, start)


def test_running_out_of_budget_is_not_an_early_stop():
    teachers = [PooledLinear(seed) for seed in (1, 2)]
    # evaluations at steps 3, 6 and 7 (the last step is always evaluated): patience runs out with the budget
    config = DistillConfig(steps=7, lr=0.0, patience=3, eval_every=3)
    result = distill(PooledLinear(0), teachers, make_batches(3), config, CPU)
    assert result["steps"] == 7 and result["stopped-early"] is False


def test_the_best_state_is_restored_after_destructive_steps():
    teachers = [PooledLinear(seed) for seed in (1, 2, 3)]
    student = PooledLinear(0)
    clips = make_clips(8, seed=3)
    target = ensemble_logits(teachers, clips)
    # identical batches: whatever the split, the validation KL is the KL on `clips`
    config = DistillConfig(steps=15, lr=50.0, eval_every=1, patience=100)
    result = distill(student, teachers, [clips] * 4, config, CPU)

    assert result["steps"] == 15
    assert result["best-step"] < result["steps"]  # the last state was not the best: a restore was needed
    assert result["best-val-kl"] <= result["initial-val-kl"]
    assert mean_kl(student, target, clips) == pytest.approx(result["best-val-kl"], rel=1e-5, abs=1e-7)


def test_steps_zero_only_measures_the_kl_from_teacher_to_student():
    teachers = [PooledLinear(seed) for seed in (1, 2)]
    student = PooledLinear(0)
    start = copy.deepcopy(student)
    clips = make_clips(8, seed=5)
    target = ensemble_logits(teachers, clips)
    result = distill(student, teachers, [clips] * 2, DistillConfig(steps=0), CPU)
    assert result["steps"] == 0 and result["best-step"] == 0 and not result["stopped-early"]
    assert result["best-val-kl"] == result["initial-val-kl"] > 0
    # KL(ensemble || student), not the reverse direction
    assert result["initial-val-kl"] == pytest.approx(mean_kl(student, target, clips), rel=1e-5)
    with torch.no_grad():
        log_student = F.log_softmax(student(clips), 1)
    reverse = F.kl_div(F.log_softmax(target, 1), log_student, reduction="batchmean", log_target=True)
    assert result["initial-val-kl"] != pytest.approx(reverse.item(), rel=1e-3)
    assert states_equal(student, start)


def test_temperature_softens_both_sides_and_scales_by_its_square():
    teachers = [PooledLinear(seed) for seed in (1, 2)]
    student = PooledLinear(0)
    clips = make_clips(8, seed=5)
    temperature = 4.0
    result = distill(student, teachers, [clips] * 2, DistillConfig(steps=0, temperature=temperature), CPU)
    target = ensemble_logits(teachers, clips) / temperature
    soft_student = nn.Sequential(student, _Scale(1 / temperature))
    expected = temperature**2 * mean_kl(soft_student, target, clips)
    assert result["initial-val-kl"] == pytest.approx(expected, rel=1e-5)


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class FlakyClips(Dataset):
    """Unlabeled clips where the items in ``broken`` fail to decode (clip None), like the clip datasets."""

    def __init__(self, count: int, broken: set[int]) -> None:
        self.clips = make_clips(count, seed=11)
        self.broken = broken

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int):
        return (None if index in self.broken else self.clips[index]), 0, index


def test_failed_batches_are_skipped():
    teachers = [PooledLinear(seed) for seed in (1, 2)]
    # batch size 2: items 0-1 and 4-5 are whole failed batches, item 2 a partial failure
    loader = DataLoader(FlakyClips(8, broken={0, 1, 2, 4, 5}), batch_size=2, collate_fn=collate_clips)
    assert sum(clips is None for clips, *_ in loader) == 2
    result = distill(PooledLinear(0), teachers, loader, DistillConfig(steps=3, eval_every=1), CPU)
    assert result["steps"] == 3


@pytest.mark.parametrize("batches", [[], [(None, torch.zeros(0), torch.zeros(0), [0, 1])] * 3])
def test_no_usable_batch_is_a_clear_error(batches):
    with pytest.raises(ValueError, match="no usable unlabeled batch"):
        distill(PooledLinear(0), [PooledLinear(1)], batches, DistillConfig(), CPU)


def test_split_is_deterministic_disjoint_and_spread():
    train, val = _split_indices(10, 0.2)
    assert (train, val) == _split_indices(10, 0.2)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == list(range(10))
    assert max(val) - min(val) >= 4  # not two neighbours at one end
    assert len(_split_indices(5, 0.0)[1]) == 1  # at least one validation batch
    assert len(_split_indices(3, 0.9)[0]) == 1  # at least one training batch
    assert _split_indices(1, 0.2) == ([0], [0])  # a single batch serves both


@pytest.mark.parametrize(
    "bad",
    [{"steps": -1}, {"lr": -1.0}, {"temperature": 0.0}, {"patience": 0}, {"eval_every": 0}, {"val_fraction": 1.0}],
)
def test_config_is_validated(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        DistillConfig(**bad)


def arrays_of(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_distill_arrays_round_trip_keeps_keys_dtypes_and_shapes():
    student = arrays_of(tiny3d(0))
    teachers = [arrays_of(tiny3d(seed)) for seed in (1, 2)]
    batches = [torch.randn(2, *CLIP_SHAPE) for _ in range(2)]
    build = lambda: build_model("tiny3d", num_classes=NUM_CLASSES)  # noqa: E731

    out, result = distill_arrays(student, teachers, build, batches, DistillConfig(steps=0), CPU)
    assert list(out) == list(student)
    for key, value in student.items():
        assert out[key].dtype == value.dtype and out[key].shape == value.shape, key
        np.testing.assert_array_equal(out[key], value)
    tracked = "backbone.blocks.0.1.num_batches_tracked"
    assert out[tracked].dtype == np.int64 and out[tracked].ndim == 0

    out, result = distill_arrays(
        student, teachers, build, batches, DistillConfig(steps=2, eval_every=1), CPU, weights=[3, 1]
    )
    assert result["steps"] == 2
    assert list(out) == list(student)
    assert all(out[k].dtype == v.dtype and out[k].shape == v.shape for k, v in student.items())


def test_distill_arrays_rejects_arrays_of_another_model():
    student = arrays_of(tiny3d(0))
    del student["head.bias"]
    build = lambda: build_model("tiny3d", num_classes=NUM_CLASSES)  # noqa: E731
    with pytest.raises(RuntimeError, match="head.bias"):
        distill_arrays(student, [student], build, [torch.randn(2, *CLIP_SHAPE)], DistillConfig(steps=0), CPU)

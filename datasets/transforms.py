"""Clip transforms: uint8 ``T×H×W×3`` clips in, normalized float32 ``C×T×H×W`` tensors out."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Kinetics-400 statistics used by torchvision's video models.
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)


def to_normalized_tensor(
    clip: np.ndarray | torch.Tensor,
    mean: Sequence[float] = KINETICS_MEAN,
    std: Sequence[float] = KINETICS_STD,
) -> torch.Tensor:
    """Turn a ``T×H×W×3`` clip with values in 0..255 (uint8 or float) into normalized float32 ``C×T×H×W``."""
    clip = torch.as_tensor(clip)
    if clip.ndim != 4 or clip.shape[-1] != 3:
        raise ValueError(f"expected a T×H×W×3 clip, got shape {tuple(clip.shape)}")
    clip = clip.permute(3, 0, 1, 2).to(torch.float32) / 255.0
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1, 1)
    return ((clip - mean_t) / std_t).contiguous()


def _pad_to_crop(clip: np.ndarray, crop_size: int) -> np.ndarray:
    """Zero-pad height and width (centred) up to ``crop_size`` where they are smaller."""
    pad_h = max(crop_size - clip.shape[1], 0)
    pad_w = max(crop_size - clip.shape[2], 0)
    if pad_h == 0 and pad_w == 0:
        return clip
    pads = ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
    return np.pad(clip, pads)


def _crop(clip: np.ndarray, top: int, left: int, crop_size: int) -> np.ndarray:
    return clip[:, top : top + crop_size, left : left + crop_size]


def _check_clip(clip: np.ndarray) -> None:
    if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8:
        raise ValueError(f"expected a uint8 T×H×W×3 clip, got {clip.dtype} {clip.shape}")


def _check_flip_map(hflip_label_map: dict[int, int]) -> None:
    # A flip applied twice is the identity, so the map must be its own inverse (left<->right);
    # a one-sided map {left: right} would turn flipped "right" clips into unflipped-looking labels.
    for label, flipped in hflip_label_map.items():
        if hflip_label_map.get(flipped, flipped) != label:
            raise ValueError(
                f"hflip_label_map must map pairs both ways: {label}->{flipped} "
                f"but {flipped}->{hflip_label_map.get(flipped, flipped)}"
            )


class TrainClipTransform:
    """Training augmentation for one clip: random crop, brightness/contrast jitter, optional flip.

    The same crop, jitter and flip are applied to every frame, so motion inside the clip is kept.

    Horizontal flip runs only when ``hflip_label_map`` is given: flipping a clip of "move left"
    produces "move right" (and cw <-> ccw), so a flip must remap such labels. The map lists the
    swapped class pairs in both directions; labels not in it are flip-invariant. Time reversal is
    never applied: it swaps every direction pair (left/right, up/down, in/out, cw/ccw, open/close),
    which real action datasets contain too.
    """

    def __init__(
        self,
        crop_size: int,
        jitter: float = 0.2,
        hflip_label_map: dict[int, int] | None = None,
        mean: Sequence[float] = KINETICS_MEAN,
        std: Sequence[float] = KINETICS_STD,
    ):
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        if hflip_label_map is not None:
            _check_flip_map(hflip_label_map)
        self.crop_size = crop_size
        self.jitter = jitter
        self.hflip_label_map = hflip_label_map
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, clip: np.ndarray, label: int, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
        """Augment a uint8 ``T×H×W×3`` clip; returns (normalized ``C×T×H×W`` tensor, possibly remapped label)."""
        _check_clip(clip)
        clip = _pad_to_crop(clip, self.crop_size)
        top = int(rng.integers(0, clip.shape[1] - self.crop_size + 1))
        left = int(rng.integers(0, clip.shape[2] - self.crop_size + 1))
        frames = torch.from_numpy(np.ascontiguousarray(_crop(clip, top, left, self.crop_size))).to(torch.float32)
        if self.jitter > 0:
            brightness, contrast = rng.uniform(1.0 - self.jitter, 1.0 + self.jitter, size=2)
            # Contrast pivots around the mean of the whole clip so every frame changes alike.
            clip_mean = frames.mean()
            frames = ((frames - clip_mean) * float(contrast) + clip_mean) * float(brightness)
            frames = frames.clamp_(0.0, 255.0)
        if self.hflip_label_map is not None and rng.random() < 0.5:
            frames = frames.flip(2)
            label = self.hflip_label_map.get(label, label)
        return to_normalized_tensor(frames, self.mean, self.std), label


class EvalClipTransform:
    """Deterministic evaluation transform: centre crop (zero-padded if smaller), then normalize."""

    def __init__(self, crop_size: int, mean: Sequence[float] = KINETICS_MEAN, std: Sequence[float] = KINETICS_STD):
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        self.crop_size = crop_size
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, clip: np.ndarray) -> torch.Tensor:
        """Centre-crop and normalize a uint8 ``T×H×W×3`` clip into float32 ``C×T×H×W``."""
        _check_clip(clip)
        clip = _pad_to_crop(clip, self.crop_size)
        top = (clip.shape[1] - self.crop_size) // 2
        left = (clip.shape[2] - self.crop_size) // 2
        return to_normalized_tensor(np.ascontiguousarray(_crop(clip, top, left, self.crop_size)), self.mean, self.std)

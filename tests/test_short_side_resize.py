"""Short-side resize (an int ``resize``, torchvision's convention): resized_shape, decode_frames,
ClipSpec and the clip cache, whose exact-size folders must keep their old digest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from datasets.clip_cache import FORMAT_VERSION, ClipCache
from datasets.clip_dataset import ClipSpec, EvalClipDataset
from datasets.layouts import VideoSample
from datasets.transforms import EvalClipTransform
from datasets.video_io import decode_frames, resized_shape, write_video

NUM_FRAMES = 6
RED, BLUE, GREEN = (220, 30, 30), (30, 30, 220), (30, 200, 30)


def quadrant_frames(height: int, width: int) -> np.ndarray:
    """Left half red, right half blue, with a green top-left quarter: where each lands shows the resize."""
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    frame[:, : width // 2] = RED
    frame[:, width // 2 :] = BLUE
    frame[: height // 2, : width // 4] = GREEN
    return np.repeat(frame[None], NUM_FRAMES, axis=0)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("short_side")
    paths = {"landscape": folder / "landscape.avi", "portrait": folder / "portrait.avi"}
    write_video(paths["landscape"], quadrant_frames(90, 160))  # 16:9
    write_video(paths["portrait"], quadrant_frames(160, 90))
    return paths


def region_mean(frames: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    return frames[:, rows, cols].reshape(-1, 3).mean(axis=0)


# ----------------------------------------------------------------------------- resized_shape


@pytest.mark.parametrize(
    ("height", "width", "resize", "expected"),
    [
        (90, 160, 45, (45, 80)),  # landscape: height is the short side
        (160, 90, 45, (80, 45)),  # portrait: width is
        (64, 64, 32, (32, 32)),  # square
        (240, 320, 128, (128, 170)),  # 170.67 rounds down, as torchvision's int()
        (90, 160, (30, 40), (30, 40)),  # a tuple is exact, aspect ignored
        (90, 160, None, (90, 160)),  # None is native
    ],
)
def test_resized_shape(height, width, resize, expected):
    assert resized_shape(height, width, resize) == expected


@pytest.mark.parametrize("height, width", [(90, 160), (160, 90), (64, 64), (240, 320), (101, 37), (37, 101), (7, 300)])
@pytest.mark.parametrize("short", [1, 17, 45, 112, 128])
def test_resized_shape_matches_torchvision_int_resize(height, width, short):
    resized = TF.resize(torch.zeros(3, height, width), short, antialias=False)
    assert resized_shape(height, width, short) == tuple(resized.shape[1:])


@pytest.mark.parametrize("short", [0, -3])
def test_resized_shape_rejects_a_non_positive_short_side(short):
    with pytest.raises(ValueError):
        resized_shape(90, 160, short)


# ----------------------------------------------------------------------------- decoding


def test_short_side_decode_is_the_exact_resize_of_the_kept_aspect(videos):
    frames = decode_frames(videos["landscape"], range(NUM_FRAMES), 45)
    assert frames.shape == (NUM_FRAMES, 45, 80, 3) and frames.dtype == np.uint8
    # Same scaler, same output size: the very pixels of the exact (45, 80) decode.
    assert np.array_equal(frames, decode_frames(videos["landscape"], range(NUM_FRAMES), (45, 80)))
    # The picture is scaled, not cropped or squashed: each colour sits in its proportional place
    # (regions kept away from the edges, where bilinear blending and chroma subsampling mix colours).
    assert np.abs(region_mean(frames, slice(3, 19), slice(3, 17)) - GREEN).max() < 25
    assert np.abs(region_mean(frames, slice(26, 42), slice(3, 37)) - RED).max() < 25
    assert np.abs(region_mean(frames, slice(3, 42), slice(44, 77)) - BLUE).max() < 25


def test_short_side_decode_of_a_portrait_video(videos):
    frames = decode_frames(videos["portrait"], [0, 3, 3], 45)
    assert frames.shape == (3, 80, 45, 3)
    assert np.array_equal(frames, decode_frames(videos["portrait"], [0, 3, 3], (80, 45)))
    assert np.abs(region_mean(frames, slice(3, 37), slice(2, 9)) - GREEN).max() < 25
    assert np.abs(region_mean(frames, slice(3, 77), slice(26, 43)) - BLUE).max() < 25


# ----------------------------------------------------------------------------- ClipSpec and the cache


def test_clip_spec_accepts_a_short_side_and_rejects_non_positive_sizes():
    assert ClipSpec(resize=45, crop_size=40).resize == 45
    for resize in (0, -1, (0, 64), (64, -1)):
        with pytest.raises(ValueError):
            ClipSpec(resize=resize)


def test_short_side_cache_builds_loads_and_has_its_own_folder(videos, tmp_path):
    cache = ClipCache(tmp_path, 45)
    assert cache.load(videos["landscape"]) is None
    built = cache.build(videos["landscape"], NUM_FRAMES)
    direct = decode_frames(videos["landscape"], range(NUM_FRAMES), 45)
    assert built.shape == (NUM_FRAMES, 45, 80, 3) and np.array_equal(built, direct)
    loaded = cache.load(videos["landscape"])
    assert loaded is not None and np.array_equal(loaded, direct)
    assert cache.entry_path(videos["landscape"]).parent == tmp_path / cache.settings_digest
    # Short side 45 is neither 45×45 nor the 45×80 it happens to produce here.
    assert cache.settings_digest != ClipCache(tmp_path, (45, 45)).settings_digest
    assert cache.settings_digest != ClipCache(tmp_path, (45, 80)).settings_digest
    assert cache.settings_digest != ClipCache(tmp_path, 46).settings_digest
    # A portrait entry of the same cache: short side 45 on its width.
    assert cache.build(videos["portrait"], NUM_FRAMES).shape == (NUM_FRAMES, 80, 45, 3)
    assert cache.load(videos["portrait"]).shape == (NUM_FRAMES, 80, 45, 3)


def test_short_side_cache_rejects_an_entry_of_another_short_side(videos, tmp_path):
    cache = ClipCache(tmp_path, 45)
    entry = cache.entry_path(videos["landscape"])
    entry.parent.mkdir(parents=True)
    np.save(entry, np.zeros((NUM_FRAMES, 46, 80, 3), dtype=np.uint8))
    assert cache.load(videos["landscape"]) is None
    np.save(entry, np.zeros((NUM_FRAMES, 45, 80, 4), dtype=np.uint8))
    assert cache.load(videos["landscape"]) is None
    np.save(entry, np.zeros((NUM_FRAMES, 80, 45, 3), dtype=np.uint8))  # short side 45 either way
    assert cache.load(videos["landscape"]) is not None


@pytest.mark.parametrize("size", [(64, 64), (40, 48), (128, 171)])
def test_exact_size_settings_digest_is_unchanged(tmp_path, size):
    settings = {"format": FORMAT_VERSION, "resize": list(size), "pyav": av.__version__}
    expected = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    assert ClipCache(tmp_path, size).settings_digest == expected


def test_dataset_with_a_short_side_cache_gives_the_uncached_clips(videos, tmp_path):
    spec = ClipSpec(clip_len=4, stride=1, resize=45, crop_size=40)
    samples = [VideoSample(str(videos["landscape"]), 0, "l"), VideoSample(str(videos["portrait"]), 1, "p")]
    cached = EvalClipDataset(samples, spec, EvalClipTransform(40), clips_per_video=2, cache_dir=tmp_path)
    plain = EvalClipDataset(samples, spec, EvalClipTransform(40), clips_per_video=2)
    for index in range(len(plain)):
        clip, label, video_index = cached[index]
        assert clip is not None and clip.shape == (3, 4, 40, 40)
        assert torch.equal(clip, plain[index][0]) and (label, video_index) == plain[index][1:]
    shapes = sorted(np.load(path, mmap_mode="r").shape for path in tmp_path.rglob("*.npy"))
    assert shapes == [(NUM_FRAMES, 45, 80, 3), (NUM_FRAMES, 80, 45, 3)]
    assert {path.parent.name for path in tmp_path.rglob("*.npy")} == {ClipCache(tmp_path, 45).settings_digest}

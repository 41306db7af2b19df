"""Clip datasets, collate and scan on tiny real videos, plus the train/eval transforms."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch

from datasets.clip_dataset import ClipSpec, EvalClipDataset, TrainClipDataset, collate_clips, scan_videos
from datasets.layouts import VideoSample
from datasets.transforms import EvalClipTransform, TrainClipTransform, to_normalized_tensor
from datasets.video_io import clip_frame_indices, decode_frames, uniform_clip_starts, write_video

SPEC = ClipSpec(clip_len=8, stride=2, resize=(40, 48), crop_size=32)
LOGGER = "datasets.clip_dataset"


def random_frames(num_frames: int, seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> list[VideoSample]:
    folder = tmp_path_factory.mktemp("clips")
    result = []
    for label, num_frames in enumerate((30, 24, 6)):  # the last one is shorter than a clip span (15)
        path = folder / f"video{label}.avi"
        write_video(path, random_frames(num_frames, seed=label))
        result.append(VideoSample(path=str(path), label=label, group=f"g{label}"))
    corrupt = folder / "corrupt.avi"
    corrupt.write_bytes(np.random.default_rng(9).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    result.append(VideoSample(path=str(corrupt), label=1, group="bad"))
    return result


GOOD, CORRUPT = slice(0, 3), 3


def warnings_about(caplog, path: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and path in r.getMessage()]


# ----------------------------------------------------------------------------- transforms


def test_to_normalized_tensor_layout_and_values():
    clip = np.zeros((4, 5, 6, 3), np.uint8)
    clip[..., 0] = 255
    out = to_normalized_tensor(clip, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert out.dtype == torch.float32 and out.shape == (3, 4, 5, 6)
    assert torch.all(out[0] == 1.0) and torch.all(out[1:] == -1.0)


def test_eval_transform_centre_crops_and_pads():
    clip = random_frames(4, seed=1, height=40, width=50)
    out = EvalClipTransform(32)(clip)
    assert out.shape == (3, 4, 32, 32)
    assert torch.equal(out, to_normalized_tensor(clip[:, 4:36, 9:41]))
    assert EvalClipTransform(64)(clip).shape == (3, 4, 64, 64)


def asymmetric_clip() -> np.ndarray:
    clip = np.zeros((4, 16, 16, 3), np.uint8)
    clip[:, :, :5] = 200  # bright left edge: a flip is unmistakable
    return clip


def flipped(clip: np.ndarray) -> torch.Tensor:
    return to_normalized_tensor(clip[:, :, ::-1].copy())


def test_train_transform_never_flips_without_a_map():
    clip = asymmetric_clip()
    transform = TrainClipTransform(crop_size=16, jitter=0.0)
    for seed in range(50):
        out, label = transform(clip, 3, np.random.default_rng(seed))
        assert label == 3
        assert torch.equal(out, to_normalized_tensor(clip))


def test_train_transform_flip_remaps_labels():
    clip = asymmetric_clip()
    transform = TrainClipTransform(crop_size=16, jitter=0.0, hflip_label_map={0: 1, 1: 0})
    flips = 0
    for seed in range(60):
        for label, label_if_flipped in ((0, 1), (1, 0), (2, 2)):  # 2 is flip-invariant
            out, new_label = transform(clip, label, np.random.default_rng(seed))
            if torch.equal(out, flipped(clip)):
                flips += 1
                assert new_label == label_if_flipped
            else:
                assert torch.equal(out, to_normalized_tensor(clip)) and new_label == label
    assert 0.3 < flips / 180 < 0.7


def test_train_transform_rejects_one_sided_flip_map():
    with pytest.raises(ValueError, match="both ways"):
        TrainClipTransform(16, hflip_label_map={0: 1})


def test_train_transform_crops_jitters_and_pads():
    clip = random_frames(4, seed=2, height=40, width=50)
    transform = TrainClipTransform(crop_size=32, jitter=0.3)
    out, _ = transform(clip, 0, np.random.default_rng(0))
    assert out.shape == (3, 4, 32, 32) and out.dtype == torch.float32
    again, _ = transform(clip, 0, np.random.default_rng(0))
    assert torch.equal(out, again)
    assert TrainClipTransform(crop_size=64)(clip, 0, np.random.default_rng(0))[0].shape == (3, 4, 64, 64)
    # the jitter is one brightness/contrast change for the whole clip: frame differences scale alike
    still = np.repeat(clip[:1], 4, axis=0)
    out, _ = TrainClipTransform(crop_size=32, jitter=0.3)(still, 0, np.random.default_rng(1))
    assert torch.allclose(out[:, 0], out[:, 3])


# ----------------------------------------------------------------------------- datasets


def test_train_dataset_shapes(samples):
    dataset = TrainClipDataset(samples[GOOD], SPEC, TrainClipTransform(SPEC.crop_size))
    assert len(dataset) == 3
    for index in range(3):
        clip, label, returned_index = dataset[index]
        assert clip.dtype == torch.float32 and clip.shape == (3, 8, 32, 32)
        assert (label, returned_index) == (samples[index].label, index)


def test_train_dataset_is_reproducible_per_seed_and_epoch(samples):
    def clips(seed: int, epoch: int) -> list[torch.Tensor]:
        dataset = TrainClipDataset(samples[GOOD], SPEC, TrainClipTransform(SPEC.crop_size), seed=seed)
        dataset.set_epoch(epoch)
        return [dataset[i][0] for i in range(2)]

    reference = clips(seed=0, epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(reference, clips(seed=0, epoch=1)))
    assert not all(torch.equal(a, b) for a, b in zip(reference, clips(seed=0, epoch=2)))
    assert not all(torch.equal(a, b) for a, b in zip(reference, clips(seed=1, epoch=1)))


def test_eval_dataset_yields_distinct_uniform_clips_per_video(samples):
    transform = EvalClipTransform(SPEC.crop_size)
    dataset = EvalClipDataset(samples[GOOD], SPEC, transform, clips_per_video=3)
    # 30 and 24 frames hold 3 distinct clips of span 15; the 6-frame video only one (start 0).
    layout = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    assert len(dataset) == len(layout)
    for item, (video, clip_number) in enumerate(layout):
        clip, label, video_index = dataset[item]
        assert video_index == video and label == samples[video_index].label
        num_frames = (30, 24, 6)[video_index]
        start = uniform_clip_starts(num_frames, SPEC.clip_len, SPEC.stride, 3)[clip_number]
        indices = clip_frame_indices(num_frames, SPEC.clip_len, SPEC.stride, start)
        expected = transform(decode_frames(samples[video_index].path, indices, SPEC.resize))
        assert torch.equal(clip, expected)
    for video in (0, 1):  # no clip of a video repeats another
        clips = [dataset[i][0] for i, (v, _) in enumerate(layout) if v == video]
        assert not any(torch.equal(a, b) for a, b in itertools.combinations(clips, 2))
    with pytest.raises(IndexError):
        dataset[len(layout)]


def test_corrupt_file_gives_none_and_one_warning(samples, caplog):
    corrupt = samples[CORRUPT]
    train = TrainClipDataset(samples, SPEC, TrainClipTransform(SPEC.crop_size))
    evaluation = EvalClipDataset(samples, SPEC, EvalClipTransform(SPEC.crop_size), clips_per_video=2)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(3):
            assert train[CORRUPT] == (None, corrupt.label, CORRUPT)
        # 2 + 2 + 1 clips (the 6-frame video holds one), then the unreadable file's single item
        assert len(evaluation) == 6
        assert evaluation[5] == (None, corrupt.label, CORRUPT)
        assert evaluation[5] == (None, corrupt.label, CORRUPT)
    assert len(warnings_about(caplog, corrupt.path)) == 2  # once per dataset instance


def test_collate_drops_failed_items_and_reports_them(samples):
    dataset = TrainClipDataset(samples, SPEC, TrainClipTransform(SPEC.crop_size))
    clips, labels, indices, failed = collate_clips([dataset[i] for i in (0, 3, 2)])
    assert clips.shape == (2, 3, 8, 32, 32)
    assert labels.tolist() == [0, 2] and indices.tolist() == [0, 2] and failed == [3]
    clips, labels, indices, failed = collate_clips([dataset[3]])
    assert clips is None and labels.numel() == 0 and indices.numel() == 0 and failed == [3]


def test_collate_works_in_dataloader_workers(samples):
    dataset = EvalClipDataset(samples, SPEC, EvalClipTransform(SPEC.crop_size), clips_per_video=1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=collate_clips)
    batches = list(loader)
    assert sum(len(labels) for _, labels, _, _ in batches) == 3
    assert [i for *_, failed in batches for i in failed] == [CORRUPT]


def test_scan_videos_splits_usable_and_skipped(samples, tmp_path, caplog):
    missing = VideoSample(path=str(tmp_path / "gone.avi"), label=0, group="x")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        usable, skipped = scan_videos([*samples, missing])
    assert usable == samples[GOOD]
    assert [path for path, _ in skipped] == [samples[CORRUPT].path, missing.path]
    assert all(reason for _, reason in skipped)
    assert len(warnings_about(caplog, samples[CORRUPT].path)) == 1
    assert len(warnings_about(caplog, missing.path)) == 1


def test_clip_spec_validates():
    assert ClipSpec() == ClipSpec(16, 1, (64, 64), 64)
    with pytest.raises(ValueError):
        ClipSpec(clip_len=0)

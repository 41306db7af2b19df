"""Tests for the synthetic motion dataset: UCF-101 layout, decodability, determinism, caching, CLI, statistics."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest

from datasets import synthetic
from datasets.synthetic import CLASS_NAMES, SyntheticSpec, ensure_synthetic, generate_dataset, main, render_video

SMALL = SyntheticSpec(num_classes=4, videos_per_class=3, num_frames=12, size=32, seed=1)
TINY = SyntheticSpec(num_classes=2, videos_per_class=1, num_frames=4, size=16)
TRAIN_LINE = re.compile(r"^(\w+)/v_\1_g(\d\d)_c(\d\d)\.avi (\d+)$")
TEST_LINE = re.compile(r"^(\w+)/v_\1_g(\d\d)_c(\d\d)\.avi$")


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("gen") / "small", SMALL)


def _read(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _groups_in(lines: list[str], pattern: re.Pattern[str]) -> set[int]:
    return {int(pattern.match(line).group(2)) for line in lines}


def test_layout_is_ucf101(small_root: Path) -> None:
    classes = list(CLASS_NAMES[:4])
    splits = small_root / "ucfTrainTestlist"
    assert _read(splits / "classInd.txt") == [f"{i} {name}" for i, name in enumerate(classes, start=1)]
    assert sorted(p.name for p in (small_root / "UCF-101").iterdir()) == sorted(classes)
    videos = sorted(p.relative_to(small_root / "UCF-101").as_posix() for p in small_root.glob("UCF-101/*/*"))
    assert len(videos) == 4 * 3
    for fold in (1, 2, 3):
        train = _read(splits / f"trainlist0{fold}.txt")
        test = _read(splits / f"testlist0{fold}.txt")
        for line in train:
            match = TRAIN_LINE.match(line)
            assert match, line
            assert classes[int(match.group(4)) - 1] == match.group(1)
        assert all(TEST_LINE.match(line) for line in test), test
        listed = [line.split()[0] for line in train] + test
        assert sorted(listed) == videos  # every video exactly once per fold
        assert train and test
    meta = json.loads((small_root / "synthetic.json").read_text())
    assert meta["key"] == SMALL.key() and meta["spec"]["size"] == 32 and meta["num_videos"] == 12
    assert sorted(p.name for p in small_root.parent.iterdir()) == ["small"]  # no temporary folder left


def test_every_video_decodes(small_root: Path) -> None:
    for path in sorted(small_root.glob("UCF-101/*/*.avi")):
        with av.open(str(path)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        assert len(frames) == SMALL.num_frames, path
        assert frames[0].shape == (32, 32, 3)
        assert np.std(frames[0]) > 5  # not a blank frame


def test_fold_test_groups_are_ucf101_and_disjoint_from_train(small_root: Path) -> None:
    splits = small_root / "ucfTrainTestlist"
    for fold in (1, 2, 3):
        train_groups = _groups_in(_read(splits / f"trainlist0{fold}.txt"), TRAIN_LINE)
        test_groups = _groups_in(_read(splits / f"testlist0{fold}.txt"), TEST_LINE)
        assert test_groups <= set(range(7 * (fold - 1) + 1, 7 * fold + 1))
        assert not train_groups & test_groups
    assert _groups_in(_read(splits / "testlist01.txt"), TEST_LINE) == {1}  # 3 videos spread over g01, g09, g17


def test_render_is_deterministic() -> None:
    first = render_video("RotateCW", SMALL, np.random.default_rng(5))
    assert first.dtype == np.uint8 and first.shape == (12, 32, 32, 3)
    assert np.array_equal(first, render_video("RotateCW", SMALL, np.random.default_rng(5)))
    assert not np.array_equal(first, render_video("RotateCW", SMALL, np.random.default_rng(6)))
    hard = SyntheticSpec(num_frames=12, size=32, preset="hard")
    hard_video = render_video("ZoomIn", hard, np.random.default_rng(5))
    assert np.array_equal(hard_video, render_video("ZoomIn", hard, np.random.default_rng(5)))
    with pytest.raises(ValueError):
        render_video("Jump", SMALL, np.random.default_rng(0))


def test_generation_is_deterministic(small_root: Path, tmp_path: Path) -> None:
    again = generate_dataset(tmp_path / "again", SMALL)
    for name in ["classInd.txt"] + [f"{split}list0{k}.txt" for split in ("train", "test") for k in (1, 2, 3)]:
        assert (again / "ucfTrainTestlist" / name).read_text() == (small_root / "ucfTrainTestlist" / name).read_text()
    with pytest.raises(FileExistsError):
        generate_dataset(again, SMALL)


def test_spec_validation_and_key() -> None:
    assert SyntheticSpec().key() == SyntheticSpec().key()
    assert SyntheticSpec(seed=1).key() != SyntheticSpec().key()
    for bad in ({"num_classes": 3}, {"preset": "medium"}, {"size": 8}, {"num_frames": 1}):
        with pytest.raises(ValueError):
            SyntheticSpec(**bad)


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_ensure_synthetic_reuses_cache(tmp_path: Path) -> None:
    root = ensure_synthetic(tmp_path, TINY)
    assert root == tmp_path / f"synthetic-{TINY.key()}" and (root / "synthetic.json").is_file()
    before = _mtimes(root)
    assert ensure_synthetic(tmp_path, TINY) == root
    assert _mtimes(root) == before
    assert [p.name for p in tmp_path.iterdir()] == [root.name]


def test_ensure_synthetic_loses_race_gracefully(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write = synthetic._write_dataset
    target = tmp_path / f"synthetic-{TINY.key()}"

    def other_process_finishes_first(root: Path, spec: SyntheticSpec) -> int:
        monkeypatch.setattr(synthetic, "_write_dataset", write)  # the other process writes normally
        generate_dataset(target, spec)
        return write(root, spec)

    monkeypatch.setattr(synthetic, "_write_dataset", other_process_finishes_first)
    assert ensure_synthetic(tmp_path, TINY) == target
    assert (target / "synthetic.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # the loser's copy was discarded


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = ["--out", str(out), "--classes", "2", "--videos-per-class", "2", "--frames", "4", "--size", "16"]
    args += ["--seed", "3"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "4 videos" in printed
    assert len(list(out.glob("UCF-101/*/*.avi"))) == 4
    assert main(args) == 0 and "already present" in capsys.readouterr().out
    assert main(args[:-1] + ["4"]) == 1  # another spec into a full folder


# ----------------------------------------------------------------------------- statistics
# Easy preset: bright objects (>= 150) on a dark background (<= 70), noise sigma 6.
STATS = SyntheticSpec()
N_VIDEOS = 32


@functools.cache
def _rendered(class_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Object masks N×T×H×W and mean brightness per video of N easy-preset videos."""
    index = CLASS_NAMES.index(class_name)
    videos = np.stack([render_video(class_name, STATS, np.random.default_rng([99, index, i])) for i in range(N_VIDEOS)])
    grey = videos.mean(axis=-1)
    return grey > 110, grey.mean(axis=(1, 2, 3))


def _object_masks(class_name: str) -> np.ndarray:
    return _rendered(class_name)[0]


def _circular_centroid(masks: np.ndarray, axis: int) -> np.ndarray:
    """Object position along x (axis=-1) or y (axis=-2) on the torus, per frame: N×T."""
    side = masks.shape[-1]
    weights = masks.sum(axis=-2 if axis == -1 else -1)
    phase = np.exp(2j * np.pi * (np.arange(side) + 0.5) / side)
    return np.angle((weights * phase).sum(-1)) * side / (2 * np.pi)


def _wrapped_travel(positions: np.ndarray, side: int) -> np.ndarray:
    """Total signed travel per video, summing per-frame steps wrapped to (-side/2, side/2]."""
    return ((np.diff(positions, axis=-1) + side / 2) % side - side / 2).sum(-1)


def _orientation_travel(masks: np.ndarray) -> np.ndarray:
    """Total signed turn per video (radians, + = clockwise on screen) of the mask's principal axis."""
    side = masks.shape[-1]
    cx, cy = _circular_centroid(masks, -1), _circular_centroid(masks, -2)
    grid = np.arange(side) + 0.5
    dx = (grid[None, None, None, :] - cx[..., None, None] + side / 2) % side - side / 2
    dy = (grid[None, None, :, None] - cy[..., None, None] + side / 2) % side - side / 2
    moments = [(masks * a * b).sum((-2, -1)) for a, b in ((dx, dx), (dy, dy), (dx, dy))]
    axis = 0.5 * np.arctan2(2 * moments[2], moments[0] - moments[1])
    return ((np.diff(axis, axis=-1) + np.pi / 2) % np.pi - np.pi / 2).sum(-1)


def test_single_frames_carry_little_label_info_but_motion_does() -> None:
    right, left = _object_masks("MoveRight"), _object_masks("MoveLeft")
    side = STATS.size
    # Frame 0 alone: where the object is does not reveal the direction (uniform on the torus).
    first_x = [np.nonzero(masks[:, 0])[2].mean() for masks in (right, left)]
    assert abs(first_x[0] - first_x[1]) < 8, first_x
    # The motion does: every MoveRight video travels right, every MoveLeft video left.
    assert (_wrapped_travel(_circular_centroid(right, -1), side) > 10).all()
    assert (_wrapped_travel(_circular_centroid(left, -1), side) < -10).all()
    assert (np.abs(_wrapped_travel(_circular_centroid(right, -2), side)) < 2).all()


def test_rotation_and_zoom_directions() -> None:
    cw, ccw = _object_masks("RotateCW"), _object_masks("RotateCCW")
    assert (_orientation_travel(cw) > 0).mean() > 0.9
    assert (_orientation_travel(ccw) < 0).mean() > 0.9
    zoom_in, zoom_out = _object_masks("ZoomIn"), _object_masks("ZoomOut")
    assert (zoom_in[:, -1].sum((-2, -1)) > zoom_in[:, 0].sum((-2, -1))).all()
    assert (zoom_out[:, -1].sum((-2, -1)) < zoom_out[:, 0].sum((-2, -1))).all()


def test_bag_of_frames_statistics_match_across_classes() -> None:
    # Object area and brightness averaged over all frames: same distribution for every class.
    areas = {name: _object_masks(name).mean() for name in CLASS_NAMES}
    assert max(areas.values()) / min(areas.values()) < 1.4, areas
    brightness = {name: _rendered(name)[1].mean() for name in CLASS_NAMES}
    assert max(brightness.values()) / min(brightness.values()) < 1.2, brightness


def test_feddf_unlabeled_videos_are_the_synthetic_task_but_none_of_the_runs_videos(small_run_config, caplog):
    """Without feddf-data-dir (synthetic runs only) FedDF gets fresh videos of the same classes,
    drawn with another seed: none is a train or test video of the run, none carries a label."""
    from fedapp.task.config import parse_config
    from fedapp.task.data import load_video_index, unlabeled_samples

    cfg = parse_config({**small_run_config, "strategy": "fusion", "fusion-fn": "feddf", "feddf-videos": 6})
    index = load_video_index(cfg)
    with caplog.at_level("INFO", logger="fedapp.task.data"):
        samples = unlabeled_samples(cfg)
    assert len(samples) == 6 and all(s.label == -1 for s in samples)
    run_videos = {Path(s.path).resolve() for s in index.train + index.test}
    assert not run_videos & {Path(s.path).resolve() for s in samples}
    # Same task: the generator's class folders, not another dataset's.
    assert {Path(s.path).parent.name for s in samples} <= set(index.classes)
    assert "FedDF distils on 6 unlabeled videos of the synthetic task" in caplog.text

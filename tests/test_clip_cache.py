"""The decoded-clip cache (datasets/clip_cache.py), its use by the datasets and loaders, and the
GPU-facing training options (bf16 autocast, channels_last, fractional GPUs in simulation)."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets import clip_cache, clip_dataset
from datasets.clip_cache import ClipCache
from datasets.clip_dataset import ClipSpec, EvalClipDataset, TrainClipDataset, collate_clips
from datasets.layouts import VideoSample
from datasets.transforms import EvalClipTransform, TrainClipTransform
from datasets.video_io import VideoDecodeError, decode_frames, write_video
from fedapp.ops import flwr_run, start_checks
from fedapp.ops import launch as launcher
from fedapp.task.config import ConfigError, parse_config
from fedapp.task.data import eval_loader, loader_workers, train_loader
from fedapp.task.devices import input_to_device, prepare_model
from fedapp.task.models import build_model
from fedapp.task.train import evaluate_model, make_optimizer, train_epochs

SPEC = ClipSpec(clip_len=8, stride=2, resize=(40, 48), crop_size=32)
LOGGER = "datasets.clip_dataset"


def random_frames(num_frames: int, seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    for label, num_frames in enumerate((30, 24, 6)):  # the last one is shorter than a clip span (15)
        write_video(folder / f"video{label}.avi", random_frames(num_frames, seed=label))
    (folder / "corrupt.avi").write_bytes(np.random.default_rng(9).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    return folder


@pytest.fixture
def samples(video_dir) -> list[VideoSample]:
    good = [VideoSample(str(video_dir / f"video{i}.avi"), i, f"g{i}") for i in range(3)]
    return [*good, VideoSample(str(video_dir / "corrupt.avi"), 1, "bad")]


@pytest.fixture
def video(tmp_path) -> Path:
    """A video of this test only (free to rewrite or touch)."""
    path = tmp_path / "mine.avi"
    write_video(path, random_frames(20, seed=5))
    return path


@pytest.fixture
def decodes(monkeypatch) -> dict[str, int]:
    """Counts decode_frames calls by the cache (``build``) and by the datasets (``clip``)."""
    counts = {"build": 0, "clip": 0}

    def counting(kind: str):
        def wrapper(*args, **kwargs):
            counts[kind] += 1
            return decode_frames(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(clip_cache, "decode_frames", counting("build"))
    monkeypatch.setattr(clip_dataset, "decode_frames", counting("clip"))
    return counts


def entries(root: Path) -> list[Path]:
    return sorted(root.rglob("*.npy"))


def leftovers(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.startswith(".tmp-"))


# ----------------------------------------------------------------------------- the cache itself


def test_hit_returns_the_directly_decoded_frames_memory_mapped(video, tmp_path):
    cache = ClipCache(tmp_path / "cache", SPEC.resize)
    assert cache.load(video) is None
    built = cache.build(video, 20)
    loaded = cache.load(video)
    direct = decode_frames(video, range(20), SPEC.resize)
    assert isinstance(loaded, np.memmap) and not loaded.flags.writeable
    assert loaded.dtype == np.uint8 and loaded.shape == (20, *SPEC.resize, 3)
    assert np.array_equal(loaded, direct) and np.array_equal(built, direct)
    assert entries(tmp_path / "cache") == [cache.entry_path(video)]
    assert leftovers(tmp_path / "cache") == []


def test_long_video_is_built_in_chunks_with_the_same_frames(video, tmp_path, monkeypatch, decodes):
    monkeypatch.setattr(clip_cache, "CHUNK_BYTES", 7 * 40 * 48 * 3)  # 7 frames per decode call
    frames = ClipCache(tmp_path, SPEC.resize).build(video, 20)
    assert decodes["build"] == 3
    assert np.array_equal(frames, decode_frames(video, range(20), SPEC.resize))


def test_failed_build_writes_nothing_and_leaves_no_temp_file(video, tmp_path, monkeypatch):
    calls = []

    def fail_second_chunk(path, indices, size):
        calls.append(list(indices))
        if len(calls) == 2:
            raise VideoDecodeError(f"{path}: truncated")
        return decode_frames(path, indices, size)

    monkeypatch.setattr(clip_cache, "CHUNK_BYTES", 7 * 40 * 48 * 3)
    monkeypatch.setattr(clip_cache, "decode_frames", fail_second_chunk)
    cache = ClipCache(tmp_path / "cache", SPEC.resize)
    with pytest.raises(VideoDecodeError):
        cache.build(video, 20)
    assert entries(tmp_path / "cache") == [] and leftovers(tmp_path / "cache") == []
    assert cache.load(video) is None


def test_changed_source_misses_and_replaces_the_stale_entry(video, tmp_path):
    cache = ClipCache(tmp_path / "cache", SPEC.resize)
    cache.build(video, 20)
    old_entry = cache.entry_path(video)
    # new content: another size and mtime
    write_video(video, random_frames(12, seed=6))
    assert cache.entry_path(video) != old_entry and cache.load(video) is None
    assert np.array_equal(cache.build(video, 12), decode_frames(video, range(12), SPEC.resize))
    assert entries(tmp_path / "cache") == [cache.entry_path(video)]  # the stale version is gone
    # same bytes, new mtime (touch): a miss too
    stat = video.stat()
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert cache.load(video) is None


def test_key_covers_decode_settings_not_clip_cutting(video, tmp_path):
    ClipCache(tmp_path, SPEC.resize).build(video, 20)
    assert ClipCache(tmp_path, (32, 32)).load(video) is None  # another resize: other pixels
    assert ClipCache(tmp_path, (32, 32)).settings_digest != ClipCache(tmp_path, SPEC.resize).settings_digest
    # every frame is stored, so other clip lengths and strides reuse the entry
    for spec in (ClipSpec(clip_len=4, stride=1, resize=SPEC.resize, crop_size=32), SPEC):
        dataset = EvalClipDataset([VideoSample(str(video), 0, "g")], spec, EvalClipTransform(32), 2, cache_dir=tmp_path)
        assert dataset.cache.load(video) is not None


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong-shape"])
def test_corrupt_entry_is_a_miss_and_is_rewritten(video, tmp_path, decodes, caplog, damage):
    cache = ClipCache(tmp_path, SPEC.resize)
    cache.build(video, 20)
    entry = cache.entry_path(video)
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    elif damage == "garbage":
        entry.write_bytes(b"not an npy file at all")
    else:
        np.save(entry, np.zeros((20, 8, 8, 3), np.uint8))
    with caplog.at_level(logging.WARNING, logger="datasets.clip_cache"):
        assert cache.load(video) is None
    assert "decoding again" in caplog.text
    dataset = EvalClipDataset([VideoSample(str(video), 0, "g")], SPEC, EvalClipTransform(32), 1, cache_dir=tmp_path)
    decodes["build"] = 0
    assert dataset[0][0] is not None
    assert decodes["build"] == 1
    assert np.array_equal(cache.load(video), decode_frames(video, range(20), SPEC.resize))


# ----------------------------------------------------------------------------- the datasets with a cache


def test_second_load_does_not_decode_again(samples, tmp_path, decodes, monkeypatch):
    good = samples[:3]

    def make() -> EvalClipDataset:
        return EvalClipDataset(good, SPEC, EvalClipTransform(32), clips_per_video=3, cache_dir=tmp_path)

    first = [make()[i][0] for i in range(7)]  # 3 + 3 + 1: the 6-frame video holds one clip
    assert decodes == {"build": 3, "clip": 0}  # once per video, however many clips
    probes = []
    monkeypatch.setattr(clip_dataset, "probe_video", lambda path: probes.append(path))
    # a new dataset (next round, another worker, another run) reads the cache: no decode, no probe
    again = [make()[i][0] for i in range(len(make()))]
    train = TrainClipDataset(good, SPEC, TrainClipTransform(32), seed=0, cache_dir=tmp_path)
    for epoch in range(2):
        train.set_epoch(epoch)
        assert all(train[i][0] is not None for i in range(3))
    assert decodes == {"build": 3, "clip": 0} and probes == []
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_cached_and_uncached_datasets_give_the_same_tensors(samples, tmp_path):
    good = samples[:3]
    for cached in (False, True, True):  # the second cached pass reads entries written by the first
        cache_dir = tmp_path if cached else None
        evaluation = EvalClipDataset(good, SPEC, EvalClipTransform(32), clips_per_video=3, cache_dir=cache_dir)
        train = TrainClipDataset(good, SPEC, TrainClipTransform(32), seed=3, cache_dir=cache_dir)
        train.set_epoch(1)
        result = [evaluation[i] for i in range(len(evaluation))] + [train[i] for i in range(3)]
        if not cached:
            reference = result
            continue
        for (clip, label, index), (ref_clip, ref_label, ref_index) in zip(result, reference):
            assert (label, index) == (ref_label, ref_index) and torch.equal(clip, ref_clip)


def test_corrupt_source_is_skipped_counted_and_never_cached(samples, tmp_path, caplog):
    corrupt = samples[3]
    train = TrainClipDataset(samples, SPEC, TrainClipTransform(32), cache_dir=tmp_path)
    evaluation = EvalClipDataset(samples, SPEC, EvalClipTransform(32), clips_per_video=2, cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(3):
            assert train[3] == (None, corrupt.label, 3)
        assert len(evaluation) == 6  # 2 + 2 + 1 clips, one item for the unreadable file
        assert evaluation[5] == (None, corrupt.label, 3)
        assert evaluation[5] == (None, corrupt.label, 3)
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and corrupt.path in r.getMessage()]
    assert len(warnings) == 2  # once per dataset instance, as without a cache
    assert entries(tmp_path) == [] and leftovers(tmp_path) == []
    _, _, _, failed = collate_clips([train[i] for i in range(4)])
    assert failed == [3]
    assert len(entries(tmp_path)) == 3 and not train.cache.entry_path(corrupt.path).exists()


def test_truncated_source_behaves_as_without_cache(tmp_path):
    """Header intact, tail missing: the cache cannot be built, so clips decode one by one as today
    (early clips still work, late ones are skipped) and no entry is written."""
    path = tmp_path / "truncated.avi"
    write_video(path, random_frames(60, seed=7))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    sample = [VideoSample(str(path), 0, "t")]
    results = []
    for cache_dir in (None, tmp_path / "cache"):
        dataset = EvalClipDataset(sample, SPEC, EvalClipTransform(32), clips_per_video=4, cache_dir=cache_dir)
        results.append([dataset[i][0] for i in range(4)])
    uncached, cached = results
    assert [c is None for c in cached] == [c is None for c in uncached]
    assert any(c is None for c in uncached)
    assert all(torch.equal(a, b) for a, b in zip(cached, uncached) if a is not None)
    assert not (tmp_path / "cache").exists() or entries(tmp_path / "cache") == []


def test_loaders_use_the_configured_cache_in_workers(samples, tmp_path):
    cfg = parse_config(
        {
            "clip-len": 8,
            "clip-stride": 2,
            "resize": "40x48",
            "crop-size": 32,
            "eval-clips": 2,
            "batch-size": 4,
            "num-workers": 1,
            "clip-cache-dir": str(tmp_path / "clips"),
        },
        check_paths=False,
    )
    batches = list(eval_loader(cfg, samples))
    assert sum(len(labels) for _, labels, _, _ in batches) == 5  # 2 + 2 + 1 distinct clips
    assert [i for *_, failed in batches for i in failed] == [3]
    assert len(entries(tmp_path / "clips")) == 3  # written by the worker process
    assert train_loader(cfg, samples, seed=0).dataset.cache == eval_loader(cfg, samples).dataset.cache


# ----------------------------------------------------------------------------- config


def test_clip_cache_dir_config(tmp_path):
    assert parse_config({}, check_paths=False).clip_cache_dir == ""
    assert parse_config({"clip-cache-dir": str(tmp_path / "new")}, check_paths=False).clip_cache_dir
    assert parse_config({"clip-cache-dir": "~/.cache/fedvideo-clips"}, check_paths=False).clip_cache_dir
    a_file = tmp_path / "file"
    a_file.write_text("x")
    app_dir = Path(__file__).resolve().parent.parent
    for bad, message in (
        ("relative/clips", "absolute path"),
        (str(app_dir / "clip-cache"), "outside the app folder"),
        (str(a_file), "not a directory"),
    ):
        with pytest.raises(ConfigError, match="clip-cache-dir=") as error:
            parse_config({"clip-cache-dir": bad}, check_paths=False)
        assert message in str(error.value)


def test_num_workers_auto():
    assert parse_config({"num-workers": -1}, check_paths=False).num_workers == -1
    with pytest.raises(ConfigError, match="num-workers=-2"):
        parse_config({"num-workers": -2}, check_paths=False)
    assert loader_workers(0) == 0 and loader_workers(3) == 3
    assert loader_workers(-1) == max(len(os.sched_getaffinity(0)) - 1, 0)


# ----------------------------------------------------------------------------- bf16, channels_last, GPUs


def tiny_loaders(samples: list[VideoSample]) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    good = samples[:3]
    train = TrainClipDataset(good, SPEC, TrainClipTransform(32))
    evaluation = EvalClipDataset(good, SPEC, EvalClipTransform(32), clips_per_video=1)
    return (
        torch.utils.data.DataLoader(train, batch_size=3, collate_fn=collate_clips),
        torch.utils.data.DataLoader(evaluation, batch_size=3, collate_fn=collate_clips),
    )


def train_and_evaluate(samples: list[VideoSample], device: torch.device) -> tuple[dict, dict]:
    cfg = parse_config({}, check_paths=False)
    torch.manual_seed(0)
    model = prepare_model(build_model("tiny3d", num_classes=3), device, channels_last=True)
    train, evaluation = tiny_loaders(samples)
    fit = train_epochs(model, train, make_optimizer(model, cfg), 1, device, bf16=True, channels_last=True)
    scores = evaluate_model(model, evaluation, device, bf16=True, channels_last=True, num_classes=3)
    return fit, scores


def test_bf16_channels_last_training_step_on_cpu(samples):
    fit, scores = train_and_evaluate(samples, torch.device("cpu"))
    assert fit["train-clips"] == 3 and np.isfinite(fit["train-loss"])
    assert scores["num-videos"] == 3 and np.isfinite(scores["loss"])


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: channels_last_3d layout and bf16 autocast run on GPU only"
)
def test_channels_last_3d_and_bf16_autocast_on_cuda(samples):
    cuda = torch.device("cuda")
    model = prepare_model(build_model("tiny3d", num_classes=3), cuda, channels_last=True)
    conv = model.backbone.blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    clips, *_ = next(iter(tiny_loaders(samples)[0]))
    x = input_to_device(clips.pin_memory(), cuda, channels_last=True)
    assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
    fit, scores = train_and_evaluate(samples, cuda)
    assert fit["train-clips"] == 3 and np.isfinite(fit["train-loss"]) and np.isfinite(scores["loss"])


def test_launcher_passes_fractional_gpus_to_the_federation(tmp_path, monkeypatch):
    """``--federation-config`` reaches ``flwr run`` verbatim: 0.25 GPU per client (4 clients per GPU)."""
    commands: list[list[str]] = []
    monkeypatch.setenv("FEDVIDEO_FLWR_HOME", str(tmp_path / "flwr_home"))
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    monkeypatch.setattr(launcher, "start_superlink", lambda *args, **kwargs: None)
    monkeypatch.setattr(launcher, "stop_process_group", lambda proc: None)
    monkeypatch.setattr(flwr_run, "stream_run", lambda cmd, *args: commands.append(cmd))  # no process: no run id

    class NoWatchdog:  # nothing is started, so nothing to guard
        guard = release = close = lambda *args: None

    monkeypatch.setattr("fedapp.ops.watchdog.Watchdog", NoWatchdog)
    federation = flwr_run.config_text(
        {"num-supernodes": 8, "client-resources-num-cpus": 2, "client-resources-num-gpus": 0.25}
    )
    run_config = flwr_run.config_text({"results-dir": str(tmp_path / "results"), "run-name": "gpu"})
    assert launcher.main(["--run-config", run_config, "--federation-config", federation]) == 1  # nothing ran
    (cmd,) = commands
    passed = cmd[cmd.index("--federation-config") + 1]
    parsed = start_checks.config_overrides([passed])  # the same TOML reading as Flower's
    assert parsed["client-resources-num-gpus"] == 0.25 and isinstance(parsed["client-resources-num-gpus"], float)
    assert parsed["num-supernodes"] == 8
    assert "client-resources-num-gpus=0.0" in launcher.DEFAULT_FEDERATION_CONFIG

"""Inference commands on a really trained tiny3d: predict, retrieve and export."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.clip_dataset import EvalClipDataset
from datasets.layouts import VideoSample
from datasets.transforms import EvalClipTransform
from datasets.video_io import VideoDecodeError
from fedapp.server.checkpoint import model_from_checkpoint, save_checkpoint
from fedapp.task.config import AppConfig, parse_config
from fedapp.task.data import eval_loader, load_video_index, train_loader
from fedapp.task.models import build_model
from fedapp.task.train import evaluate_model, make_optimizer, train_epochs
from fedapp.tools import export, predict, retrieve
from fedapp.tools.inference import embed_video, predict_video, video_clips
from tests.conftest import fedvideo_command

PROJECT_DIR = Path(__file__).resolve().parent.parent
MAX_EPOCHS = 30
TRAIN_BUDGET_S = 40.0


@dataclass
class Trained:
    run_dir: Path
    checkpoint: Path
    cfg: AppConfig
    classes: list[str]
    test: list[VideoSample]
    eval_accuracy: float


@pytest.fixture(scope="module")
def trained(small_run_config: dict, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """tiny3d trained centrally on 4 synthetic motion classes (84 train / 36 test videos), checkpointed."""
    # 10 videos per class (conftest's default) leave 7 train videos a class: too few to generalize
    run_config = {**small_run_config, "synthetic-videos-per-class": 30, "lr": 3e-3}
    cfg = parse_config(run_config)
    index = load_video_index(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared; one thread also keeps training deterministic
    try:
        torch.manual_seed(0)
        model = build_model(cfg.model, len(index.classes))
        optimizer = make_optimizer(model, cfg)
        accuracies: list[float] = []
        start = time.perf_counter()
        for epoch in range(MAX_EPOCHS):
            # a fresh loader seed per epoch: new random clips and crops every epoch
            loader = train_loader(cfg, index.train, seed=epoch)
            accuracies.append(train_epochs(model, loader, optimizer, 1, torch.device("cpu"))["train-accuracy"])
            if (epoch >= 4 and min(accuracies[-2:]) >= 0.9) or time.perf_counter() - start > TRAIN_BUDGET_S:
                break
        evaluation = evaluate_model(model, eval_loader(cfg, index.test), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    run_dir = tmp_path_factory.mktemp("run")
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    checkpoint = save_checkpoint(run_dir, 1, arrays, run_config, index.classes, {}, [])
    return Trained(run_dir, checkpoint, cfg, list(index.classes), list(index.test), evaluation["video-accuracy"])


@pytest.fixture(scope="module")
def loaded(trained: Trained) -> tuple[torch.nn.Module, list[str], AppConfig]:
    return model_from_checkpoint(trained.checkpoint)


def one_per_class(samples: list[VideoSample]) -> list[VideoSample]:
    seen: dict[int, VideoSample] = {}
    for sample in samples:
        seen.setdefault(sample.label, sample)
    return [seen[label] for label in sorted(seen)]


def corrupt_video(folder: Path) -> Path:
    path = folder / "corrupt.avi"
    path.write_bytes(b"RIFF\x00\x00\x00\x00AVI not really a video" * 10)
    return path


# ----------------------------------------------------------------------------- shared pieces


def test_video_clips_are_the_evaluation_clips(trained: Trained, loaded) -> None:
    _, _, cfg = loaded
    sample = trained.test[0]
    dataset = EvalClipDataset([sample], cfg.clip_spec, EvalClipTransform(cfg.crop_size), cfg.eval_clips)
    expected = torch.stack([dataset[i][0] for i in range(len(dataset))])
    clips = video_clips(sample.path, cfg)
    assert clips.shape == (cfg.eval_clips, 3, cfg.clip_len, cfg.crop_size, cfg.crop_size)
    assert torch.equal(clips, expected)


def test_unreadable_video_raises_decode_error(loaded, tmp_path: Path) -> None:
    model, classes, cfg = loaded
    with pytest.raises(VideoDecodeError):
        predict_video(model, corrupt_video(tmp_path), cfg, classes)
    with pytest.raises(VideoDecodeError):
        embed_video(model, tmp_path / "missing.avi", cfg)


# ----------------------------------------------------------------------------- predict


def test_predict_classifies_held_out_videos(trained: Trained, loaded) -> None:
    model, classes, cfg = loaded
    correct = 0
    for sample in trained.test:
        result = predict_video(model, sample.path, cfg, classes, top_k=3)
        probs = [item["probability"] for item in result["top"]]
        assert result["video"] == sample.path and len(probs) == 3
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6 and min(probs) >= 0.0
        correct += result["top"][0]["label"] == classes[sample.label]
    accuracy = correct / len(trained.test)
    # chance is 0.25; the fixed-seed model scores ~0.9-1.0 on these 36 held-out videos
    assert accuracy >= 0.75, f"held-out top-1 accuracy {accuracy:.2f} (evaluation said {trained.eval_accuracy:.2f})"
    # the same clips and the same softmax averaging as evaluation: the same video accuracy
    assert accuracy == pytest.approx(trained.eval_accuracy, abs=1.5 / len(trained.test))


def test_predict_cli_json_with_a_corrupt_file(trained: Trained, tmp_path: Path, capsys) -> None:
    videos = [s.path for s in one_per_class(trained.test)]
    bad = corrupt_video(tmp_path)
    # a run folder resolves to its checkpoint
    code = predict.main([str(trained.run_dir), *videos, str(bad), "--json", "--top-k", "2"])
    entries = json.loads(capsys.readouterr().out)
    assert code == 1
    assert [e["video"] for e in entries] == [*videos, str(bad)]
    assert "error" in entries[-1] and "corrupt.avi" in entries[-1]["error"]
    for entry in entries[:-1]:
        assert len(entry["top"]) == 2 and entry["top"][0]["probability"] >= entry["top"][1]["probability"]


def test_predict_cli_text_through_the_fedvideo_command(trained: Trained) -> None:
    samples = one_per_class(trained.test)
    result = subprocess.run(
        [fedvideo_command(), "predict", str(trained.checkpoint), *(s.path for s in samples), "--top-k", "1"],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(samples)
    for line, sample in zip(lines, samples):
        assert line.startswith(f"{sample.path}: ") and len(line.split(": ", 1)[1].split(", ")) == 1


def test_predict_cli_bad_checkpoint(tmp_path: Path, trained: Trained, capsys) -> None:
    assert predict.main([str(tmp_path), trained.test[0].path]) == 2
    assert "cannot load checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------- retrieve


def run_retrieve(trained: Trained, gallery: Path, index_dir: Path, query: Path, capsys) -> dict:
    code = retrieve.main(
        [
            str(trained.checkpoint),
            "--index-dir",
            str(index_dir),
            "--videos",
            str(gallery),
            "--query",
            str(query),
            "--top-k",
            "3",
            "--json",
        ]
    )
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_retrieve_finds_the_query_and_reuses_the_index(trained: Trained, tmp_path: Path, capsys) -> None:
    gallery, index_dir = tmp_path / "gallery", tmp_path / "index"
    gallery.mkdir()
    for sample in trained.test[::4]:
        shutil.copy2(sample.path, gallery / Path(sample.path).name)
    corrupt_video(gallery)
    query = gallery / Path(trained.test[4].path).name

    first = run_retrieve(trained, gallery, index_dir, query, capsys)
    assert first["index"]["rebuilt"] is True
    assert first["index"]["videos"] == len(trained.test[::4])
    assert [f["video"] for f in first["index"]["failed"]] == ["corrupt.avi"]
    top = first["results"][0]
    assert Path(top["video"]) == query.resolve() and top["score"] == pytest.approx(1.0, abs=1e-5)
    scores = [r["score"] for r in first["results"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True) and scores[1] < 1.0 - 1e-4

    stamp = (index_dir / retrieve.INDEX_FILE).stat().st_mtime_ns
    second = run_retrieve(trained, gallery, index_dir, query, capsys)
    assert second["index"]["rebuilt"] is False
    assert (index_dir / retrieve.INDEX_FILE).stat().st_mtime_ns == stamp
    assert second["results"] == first["results"]

    added = trained.test[1]
    shutil.copy2(added.path, gallery / Path(added.path).name)
    third = run_retrieve(trained, gallery, index_dir, Path(added.path), capsys)
    assert third["index"]["rebuilt"] is True and third["index"]["videos"] == first["index"]["videos"] + 1
    assert Path(third["results"][0]["video"]).name == Path(added.path).name
    assert third["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_index_rebuilt_for_other_weights_settings_or_a_damaged_file(trained: Trained, loaded, tmp_path: Path) -> None:
    model, _, cfg = loaded
    gallery, index_dir = tmp_path / "gallery", tmp_path / "index"
    gallery.mkdir()
    for sample in trained.test[:3]:
        shutil.copy2(sample.path, gallery / Path(sample.path).name)
    weights = retrieve.checkpoint_hash(trained.checkpoint)

    built = retrieve.load_or_build_index(model, cfg, gallery, index_dir, weights)
    assert built.rebuilt and built.embeddings.shape == (3, model.feature_dim)
    assert np.allclose(np.linalg.norm(built.embeddings, axis=1), 1.0, atol=1e-5)
    assert not retrieve.load_or_build_index(model, cfg, gallery, index_dir, weights).rebuilt
    assert retrieve.load_or_build_index(model, cfg, gallery, index_dir, "0" * 64).rebuilt
    other_clips = parse_config({**cfg.to_dict(), "eval-clips": 1}, check_paths=False)
    assert retrieve.load_or_build_index(model, other_clips, gallery, index_dir, "0" * 64).rebuilt
    assert not retrieve.load_or_build_index(model, other_clips, gallery, index_dir, "0" * 64).rebuilt
    (index_dir / retrieve.EMBEDDINGS_FILE).write_bytes(b"garbage")
    assert retrieve.load_or_build_index(model, other_clips, gallery, index_dir, "0" * 64).rebuilt

    with pytest.raises(retrieve.RetrievalError):
        retrieve.query(built, np.ones(3, dtype=np.float32), 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(retrieve.RetrievalError):
        retrieve.build_index(model, cfg, empty, tmp_path / "index2", weights)


# ----------------------------------------------------------------------------- export


def test_export_matches_eager_and_reports_int8(trained: Trained, loaded, tmp_path: Path, capsys) -> None:
    model, classes, cfg = loaded
    out = tmp_path / "export"
    code = export.main([str(trained.checkpoint), "--out", str(out), "--samples", "8", "--latency-runs", "5"])
    print(capsys.readouterr().out)  # shown with -s: the measured sizes and latencies
    assert code == 0
    report = json.loads((out / export.REPORT_FILE).read_text())
    assert json.loads((out / export.CLASSES_FILE).read_text()) == classes
    assert report["bytes"]["float"] == (out / export.FLOAT_FILE).stat().st_size > 0
    assert report["bytes"]["int8"] == (out / export.INT8_FILE).stat().st_size > 0
    assert all(v > 0 for v in report["latency-ms-per-clip"].values()) and len(report["latency-ms-per-clip"]) == 3
    agreement = report["agreement"]
    assert agreement["samples"] == 8
    assert agreement["float"]["ok"] and agreement["float"]["max-abs-logit-diff"] <= 1e-4
    assert agreement["float"]["top1-agreement"] == 1.0
    assert 0.0 <= agreement["int8"]["top1-agreement"] <= 1.0
    assert 0.0 <= agreement["int8"]["max-abs-prob-diff"] <= 1.0
    assert report["quantized-layers"] == ["head"]  # tiny3d's only Linear layer

    # the files alone (no fedapp model code) give the eager model's logits and top-1
    clips = torch.cat([video_clips(s.path, cfg) for s in one_per_class(trained.test)])
    with torch.no_grad():
        eager = model(clips)
        for name in (export.FLOAT_FILE, export.INT8_FILE):
            with export._quiet_deprecations():
                scripted = torch.jit.load(str(out / name))
            logits = torch.cat([scripted(clip[None]) for clip in clips])
            if name == export.FLOAT_FILE:
                assert torch.allclose(logits, eager, atol=1e-4)
                assert torch.equal(logits.argmax(1), eager.argmax(1))
            else:  # int8 only approximates; on these confident clips it should still mostly agree
                assert (logits.argmax(1) == eager.argmax(1)).float().mean() >= 0.75


def test_exported_files_get_the_mode_the_umask_gives(small_run_config: dict, tmp_path: Path) -> None:
    """0644 under umask 022, like any file a user writes: not the 0600 of the temp files they are
    written through (a model is shipped to others; only private keys are 0600, see test_deploy)."""
    cfg = parse_config(small_run_config)
    classes = load_video_index(cfg).classes
    model = build_model(cfg.model, len(classes))
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    checkpoint = save_checkpoint(tmp_path / "run", 1, arrays, small_run_config, classes, {}, [])
    previous = os.umask(0o022)
    try:
        code = export.main([str(checkpoint), "--out", str(tmp_path / "out"), "--samples", "1", "--latency-runs", "1"])
    finally:
        os.umask(previous)
    assert code == 0
    names = [export.FLOAT_FILE, export.INT8_FILE, export.CLASSES_FILE, export.REPORT_FILE]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names)
    for name in names:
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_export_fails_when_torchscript_disagrees(trained: Trained, tmp_path: Path, monkeypatch, capsys) -> None:
    # No real model disagrees, so make the tolerance impossible to meet: the command must say so.
    monkeypatch.setattr(export, "FLOAT_TOLERANCE", -1.0)
    code = export.main([str(trained.checkpoint), "--out", str(tmp_path), "--samples", "2", "--latency-runs", "1"])
    assert code == 1
    assert "FAILED" in capsys.readouterr().err
    assert json.loads((tmp_path / export.REPORT_FILE).read_text())["agreement"]["float"]["ok"] is False

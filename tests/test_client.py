"""The NumPyClient and the ClientApp's node setup on a tiny synthetic dataset."""

import shutil

import numpy as np
import pytest

from fedapp.client.app import make_client, node_settings
from fedapp.client.video_client import NoUsableVideoError, VideoClient
from fedapp.task.config import ConfigError, parse_config
from fedapp.task.data import load_video_index, node_partition
from fedapp.task.models import build_model
from fedapp.task.train import state_arrays


@pytest.fixture(scope="module")
def cfg(small_run_config):
    return parse_config(small_run_config)


@pytest.fixture(scope="module")
def initial(cfg):
    index = load_video_index(cfg)
    return state_arrays(build_model(cfg.model, len(index.classes)))


def test_partitions_are_disjoint_and_cover_the_train_split(cfg):
    index = load_video_index(cfg)
    parts = [node_partition(cfg, index, pid, 3) for pid in range(3)]
    train_paths = [s.path for train, _ in parts for s in train]
    assert len(train_paths) == len(set(train_paths)) == len(index.train)
    test_paths = [s.path for _, test in parts for s in test]
    assert sorted(test_paths) == sorted(s.path for s in index.test)


def test_fit_trains_and_reports_metrics(cfg, initial):
    client = make_client(cfg, {"partition-id": 0, "num-partitions": 3})
    arrays, n, metrics = client.fit(initial, {"server-round": 1})
    assert n == len(client.train_samples) > 0
    assert len(arrays) == len(initial)
    assert any(not np.array_equal(a, b) for a, b in zip(arrays, initial))
    for key in ("train-loss", "train-accuracy", "clips-per-s", "skipped-videos", "partition-id"):
        assert key in metrics
    assert sum(metrics["class-counts"]) == n and metrics["skipped-videos"] == 0


def test_evaluate_scores_local_test_split(cfg, initial):
    client = make_client(cfg, {"partition-id": 1, "num-partitions": 3})
    loss, n, metrics = client.evaluate(initial, {"server-round": 1})
    assert n == len(client.test_samples) > 0 and loss > 0
    assert 0 <= metrics["video-accuracy"] <= 1 and 0 <= metrics["clip-accuracy"] <= 1
    assert metrics["num-clips"] == n * cfg.eval_clips


def test_corrupt_files_are_skipped_and_counted(cfg, initial, tmp_path):
    index = load_video_index(cfg)
    root = tmp_path / "videos"
    per_class = [[s for s in index.train if s.label == c][:2] for c in range(len(index.classes))]
    for sample in (s for group in per_class for s in group):
        dst = root / index.classes[sample.label] / sample.path.split("/")[-1]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample.path, dst)
    bad = sorted(root.rglob("*.avi"))[:2]
    bad[0].write_bytes(b"")  # empty
    bad[1].write_bytes(bad[1].read_bytes()[:300])  # truncated
    (root / index.classes[0] / "notes.avi").write_text("not a video")
    folder_cfg = parse_config({**cfg.to_dict(), "dataset": "folders", "data-dir": str(root), "test-fraction": 0.01})
    client = make_client(folder_cfg, {"data-dir": str(root)})
    assert len(client.skipped) >= 3
    assert {p.split("/")[-1] for p, _ in client.skipped} >= {bad[0].name, bad[1].name, "notes.avi"}
    _, n, metrics = client.fit(initial, {"server-round": 1})
    assert metrics["skipped-videos"] == len(client.skipped) and n == len(client.train_samples)


def test_client_without_usable_video_fails_clearly(cfg, initial):
    index = load_video_index(cfg)
    client = VideoClient(cfg, index.classes, [], [], skipped=[("a.avi", "empty file")], partition_id=4)
    with pytest.raises(NoUsableVideoError, match="partition 4: no usable training video"):
        client.fit(initial, {})
    with pytest.raises(NoUsableVideoError, match="no usable test video"):
        client.evaluate(initial, {})


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({}, "partition-id and num-partitions, or data-dir"),
        ({"partition-id": 3, "num-partitions": 3}, "partition-id=3"),
        ({"partition-id": "0", "num-partitions": 2}, "must be an integer"),
        ({"data-dir": 5}, "must be a string"),
    ],
)
def test_node_config_is_validated(node_config, message):
    with pytest.raises(ConfigError, match=message):
        node_settings(node_config)


def test_node_settings_for_own_data_dir():
    assert node_settings({"data-dir": "/videos/site-a"}) == (0, 1, "/videos/site-a")
    assert node_settings({"partition-id": 1, "num-partitions": 2}) == (1, 2, None)


def test_evaluate_fails_when_no_test_video_decodes(cfg, initial, tmp_path):
    """Files that pass the quick scan but fail to decode: an error reply, not accuracy 0.0 on 0 videos."""
    good = make_client(cfg, {"partition-id": 0, "num-partitions": 3})
    broken = []
    for i, sample in enumerate(good.test_samples):
        path = tmp_path / f"broken-{i}.avi"
        path.write_bytes(b"RIFF" + b"\x00" * 4000)
        broken.append(type(sample)(str(path), sample.label, sample.group))
    client = VideoClient(cfg, good.classes, good.train_samples, broken, partition_id=5)
    with pytest.raises(
        NoUsableVideoError, match=f"partition 5: none of its {len(broken)} test videos could be decoded"
    ):
        client.evaluate(initial, {})
    loss, n, metrics = good.evaluate(initial, {})
    assert n == metrics["num-videos"] == len(good.test_samples) > 0

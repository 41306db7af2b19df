"""The NumPyClient and the ClientApp's node setup on a tiny synthetic dataset."""

import logging
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from datasets.clip_dataset import reported_files
from fedapp.client.app import make_client, node_settings
from fedapp.client.video_client import NoUsableVideoError, VideoClient
from fedapp.task.config import ConfigError, parse_config
from fedapp.task.data import load_video_index, node_partition, train_loader
from fedapp.task.models import build_model
from fedapp.task.train import make_optimizer, state_arrays, train_epochs


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


def test_the_partition_computed_once_per_process_is_each_settings_own(cfg):
    """Virtual clients share one partition per process; another seed, size or index gets its own."""
    from datasets.partition import follow_partition, partition_samples

    index = load_video_index(cfg)
    labels, test_labels = [s.label for s in index.train], [s.label for s in index.test]
    for seed, size in ((cfg.partition_seed, 3), (cfg.partition_seed + 1, 3), (cfg.partition_seed, 4)):
        settings = replace(cfg, partition_seed=seed)
        train_parts = partition_samples(labels, [], "iid", size, seed=seed)
        test_parts = follow_partition(labels, train_parts, test_labels, seed + 1)
        for pid in range(size):
            train, test = node_partition(settings, index, pid, size)
            assert [s.path for s in train] == [index.train[i].path for i in train_parts[pid]]
            assert [s.path for s in test] == [index.test[i].path for i in test_parts[pid]]
    # An equal index that is another object (a re-read dataset) is partitioned afresh, not looked up.
    reread = replace(index, train=index.train[:-1])
    assert sum(len(node_partition(cfg, reread, pid, 3)[0]) for pid in range(3)) == len(index.train) - 1


def test_local_test_splits_follow_the_training_labels(small_run_config):
    """Under label skew a site is tested on its own classes, not on an independent draw."""
    skewed = parse_config({**small_run_config, "partitioning": "dirichlet", "dirichlet-alpha": 0.1})
    index = load_video_index(skewed)
    for pid in range(3):
        train, test = node_partition(skewed, index, pid, 3)
        trained = np.bincount([s.label for s in train], minlength=len(index.classes))
        tested = np.bincount([s.label for s in test], minlength=len(index.classes))
        share = trained / np.bincount([s.label for s in index.train], minlength=len(index.classes))
        test_per_class = np.bincount([s.label for s in index.test], minlength=len(index.classes))
        assert np.all(np.abs(tested - share * test_per_class) < 1 + 1e-9) or len(test) == 1
        assert test


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


def test_corrupt_files_are_skipped_and_counted(cfg, initial, tmp_path, caplog):
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
    own = {k: v for k, v in cfg.to_dict().items() if not k.startswith("synthetic-")}  # only for dataset="synthetic"
    folder_cfg = parse_config({**own, "dataset": "folders", "data-dir": str(root), "test-fraction": 0.01})
    with caplog.at_level(logging.WARNING, logger="datasets.clip_dataset"):
        client = make_client(folder_cfg, {"data-dir": str(root)}, run_id=101)
        make_client(folder_cfg, {"data-dir": str(root)}, run_id=101)  # the next round's message
    assert len(client.skipped) >= 3
    assert {p.split("/")[-1] for p, _ in client.skipped} >= {bad[0].name, bad[1].name, "notes.avi"}
    assert len(warnings_about(caplog, "notes.avi")) == 1  # scanned once, warned once in the run
    _, n, metrics = client.fit(initial, {"server-round": 1})
    assert metrics["skipped-videos"] == len(client.skipped) and n == len(client.train_samples)
    with caplog.at_level(logging.WARNING, logger="datasets.clip_dataset"):
        make_client(folder_cfg, {"data-dir": str(root)}, run_id=102)  # a new run in the same process
    assert len(warnings_about(caplog, "notes.avi")) == 2


def warnings_about(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and name in r.getMessage()]


def test_a_file_that_fails_to_decode_is_warned_about_once_per_run(cfg, initial, tmp_path, caplog):
    """It passes the quick scan and fails every epoch of every round: one warning per run, while
    every round still counts it (failed clips in the metrics)."""
    good = make_client(cfg, {"partition-id": 0, "num-partitions": 3})
    broken = tmp_path / "broken-video.avi"
    broken.write_bytes(b"RIFF" + b"\x00" * 4000)  # a header the scan accepts, no decodable frame
    sample = type(good.train_samples[0])(str(broken), good.train_samples[0].label, "broken")
    multi_epoch = replace(cfg, local_epochs=2)
    with caplog.at_level(logging.WARNING, logger="datasets.clip_dataset"):
        for server_round in (1, 2, 3):  # a new client every round, as the ClientApp makes one per message
            client = VideoClient(
                multi_epoch, good.classes, [*good.train_samples, sample], [sample, *good.test_samples], run_id=7
            )
            _, _, metrics = client.fit(initial, {"server-round": server_round})
            assert metrics["failed-clips"] == 2  # one clip per epoch, counted every round
            _, _, scores = client.evaluate(initial, {"server-round": server_round})
            assert scores["failed-clips"] == 1  # an unreadable file is one evaluation item, not eval-clips
        assert len(warnings_about(caplog, broken.name)) == 1
        VideoClient(multi_epoch, good.classes, [*good.train_samples, sample], [], run_id=8).fit(initial, {})
        assert len(warnings_about(caplog, broken.name)) == 2  # a new run warns again


def test_dataloader_workers_hand_their_failures_back(cfg, tmp_path):
    """A worker's memory of what it warned about dies with it at the end of the epoch: the training
    loop records the failures in the main process, so the next epoch's workers know them."""
    good = make_client(cfg, {"partition-id": 0, "num-partitions": 3})
    broken = tmp_path / "broken-in-worker.avi"
    broken.write_bytes(b"RIFF" + b"\x00" * 4000)
    samples = [*good.train_samples[:3], type(good.train_samples[0])(str(broken), 0, "broken")]
    scope = ("run", "workers-test", 0)
    model = build_model(cfg.model, len(good.classes))
    loader = train_loader(replace(cfg, num_workers=1), samples, seed=0, warn_scope=scope)
    metrics = train_epochs(model, loader, make_optimizer(model, cfg), 1, torch.device("cpu"))
    assert metrics["failed-clips"] == 1 and str(broken) in reported_files(scope)


def test_client_without_usable_video_fails_clearly(cfg, initial):
    index = load_video_index(cfg)
    client = VideoClient(cfg, index.classes, [], [], skipped=[("a.avi", "empty file")], partition_id=4)
    with pytest.raises(NoUsableVideoError, match="partition 4: no usable training video"):
        client.fit(initial, {})
    # No test video is not a failure: the site skips its local evaluation (the server records it).
    loss, n, metrics = client.evaluate(initial, {})
    assert n == 0 and metrics["no-test-videos"] == 1 and metrics["partition-id"] == 4


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

"""split.csv and the warnings for a class or a site without a test video, on a real folder dataset
run in process: every file's class, side and site written down; the site without a test video
skips its local evaluation (one line, recorded as not evaluated, not a failure)."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np

from bench.inprocess import run_inprocess
from datasets.layouts import VideoIndex, VideoSample, _hash_fraction
from datasets.video_io import write_video
from fedapp.server.split import SPLIT_FILE, shared_partitions, split_rows


def write_folder_dataset(root, groups_by_class: dict[str, list[str]]) -> None:
    rng = np.random.default_rng(0)
    for name, groups in groups_by_class.items():
        for group in groups:
            frames = rng.integers(0, 255, size=(12, 32, 32, 3), dtype=np.uint8)
            write_video(root / name / f"v_{name}_{group}_c01.avi", frames, fps=25)


def test_split_rows_name_every_file_its_side_and_site():
    index = VideoIndex(
        classes=["a", "b"],
        train=[VideoSample("/v/a1.avi", 0, "g01"), VideoSample("/v/b1.avi", 1, "g02")],
        test=[VideoSample("/v/a2.avi", 0, "g03")],
    )
    assert split_rows(index, None) == [
        ("/v/a1.avi", "a", "g01", "train", ""),
        ("/v/b1.avi", "b", "g02", "train", ""),
        ("/v/a2.avi", "a", "g03", "test", ""),
    ]
    rows = split_rows(index, ([[1], [0]], [[], [0]]))
    assert [row[4] for row in rows] == [1, 0, 1]


def test_sites_are_known_only_when_all_split_the_servers_dataset():
    site = {"partition-id": 0, "num-partitions": 3, "own-data": 0}
    assert shared_partitions([site, {**site, "partition-id": 2}]) == 3
    assert shared_partitions([site, {**site, "own-data": 1}]) is None  # a site with a folder of its own
    assert shared_partitions([{**site, "num-partitions": 1}]) is None
    assert shared_partitions([site, {**site, "num-partitions": 4}]) is None


def test_a_class_and_a_site_without_test_video_are_warned_about_and_written_down(small_run_config, tmp_path, caplog):
    groups = [f"g{i:02d}" for i in range(1, 10)]
    by_hash = sorted(groups, key=_hash_fraction)
    test_group = by_hash[0]  # the one group below test-fraction: 2 test videos (classes a and b)
    test_fraction = (_hash_fraction(by_hash[0]) + _hash_fraction(by_hash[1])) / 2
    layout = {"a": groups[:6] + [test_group], "b": groups[:6] + [test_group], "c": by_hash[1:5]}
    layout = {name: sorted(set(g)) for name, g in layout.items()}
    root = tmp_path / "videos"
    write_folder_dataset(root, layout)
    own = {k: v for k, v in small_run_config.items() if not k.startswith("synthetic-")}
    config = {
        **own,
        "dataset": "folders",
        "data-dir": str(root),
        "test-fraction": test_fraction,
        "num-server-rounds": 1,
        "min-train-nodes": 3,
        "min-evaluate-nodes": 3,
        "min-available-nodes": 3,
        "tensorboard": False,
    }
    with caplog.at_level(logging.INFO):
        results = run_inprocess(config, 3, tmp_path / "run")

    rows = list(csv.DictReader((results.dir / SPLIT_FILE).open()))
    files = sorted(str(p) for p in root.rglob("*.avi"))
    assert sorted(row["path"] for row in rows) == files  # every file, once
    for row in rows:
        assert row["class"] == row["path"].split("/")[-2]
        assert row["split"] == ("test" if f"_{test_group}_" in row["path"] else "train")
        assert row["site"] in {"0", "1", "2"}  # every file is held by one of the 3 sites
    tested_sites = {row["site"] for row in rows if row["split"] == "test"}
    assert len(tested_sites) == 2  # 2 test videos for 3 sites

    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 of 3 classes have no test video: c." in m for m in messages), messages
    (untested,) = {"0", "1", "2"} - tested_sites
    assert any(f"1 of 3 sites have no test video (partition-id {untested})" in m for m in messages), messages

    evaluate = json.loads((results.dir / "rounds.jsonl").read_text().splitlines()[1])["evaluate-clients"]
    assert evaluate["failed"] == []  # skipped, not a failure
    assert [site["partition-id"] for site in evaluate["not-evaluated"]] == [int(untested)]
    assert len(evaluate["clients"]) == 2
    client_lines = [m for m in messages if "has no test video: local evaluation skipped" in m]
    assert client_lines == [f"partition {untested} has no test video: local evaluation skipped"]

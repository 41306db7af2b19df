"""Layout readers on tiny fake trees (empty files: only parsing and splitting are tested here)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from datasets.layouts import (
    LAYOUTS,
    LayoutError,
    VideoSample,
    load_class_folders,
    load_hmdb51,
    load_manifest,
    load_ucf101,
)


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def names(samples: list[VideoSample]) -> list[str]:
    return [Path(sample.path).name for sample in samples]


def test_layout_names():
    assert LAYOUTS == ("ucf101", "hmdb51", "folders", "manifest")


# ----------------------------------------------------------------------------- UCF-101

UCF_CLASSES = ["YoYo", "ApplyEyeMakeup", "Basketball"]  # classInd order, deliberately not sorted


@pytest.fixture
def ucf(tmp_path) -> tuple[Path, Path]:
    videos, splits = tmp_path / "UCF-101", tmp_path / "ucfTrainTestlist"
    write(splits / "classInd.txt", "".join(f"{i} {name}\r\n" for i, name in enumerate(UCF_CLASSES, 1)))
    for name in UCF_CLASSES:
        for group in (1, 2, 3):
            touch(videos / name / f"v_{name}_g{group:02d}_c01.avi")
    for fold, test_group in ((1, 1), (2, 2), (3, 3)):
        train = [(n, g) for n in UCF_CLASSES for g in (1, 2, 3) if g != test_group]
        write(
            splits / f"trainlist0{fold}.txt",
            "".join(f"{n}/v_{n}_g{g:02d}_c01.avi {UCF_CLASSES.index(n) + 1}\n" for n, g in train),
        )
        write(splits / f"testlist0{fold}.txt", "".join(f"{n}/v_{n}_g{test_group:02d}_c01.avi\n" for n in UCF_CLASSES))
    return videos, splits


def test_ucf101_reads_classes_labels_groups(ucf):
    index = load_ucf101(*ucf)
    assert index.classes == UCF_CLASSES
    assert len(index.train) == 6 and len(index.test) == 3
    assert {s.group for s in index.train} == {"g02", "g03"} and {s.group for s in index.test} == {"g01"}
    for sample in index.train + index.test:
        assert Path(sample.path).is_absolute()
        assert Path(sample.path).parent.name == UCF_CLASSES[sample.label]
    assert [s.label for s in index.test] == [0, 1, 2]


def test_ucf101_fold_selects_split_files(ucf):
    assert {s.group for s in load_ucf101(*ucf, fold=2).test} == {"g02"}
    assert {s.group for s in load_ucf101(*ucf, fold=3).test} == {"g03"}


@pytest.mark.parametrize("fold", [0, 4])
def test_ucf101_bad_fold(ucf, fold):
    with pytest.raises(LayoutError, match="fold"):
        load_ucf101(*ucf, fold=fold)


def test_ucf101_missing_videos_are_skipped_with_a_counting_warning(ucf, caplog):
    videos, splits = ucf
    (videos / "YoYo" / "v_YoYo_g02_c01.avi").unlink()
    (videos / "YoYo" / "v_YoYo_g03_c01.avi").unlink()
    with caplog.at_level(logging.WARNING, logger="datasets.layouts"):
        index = load_ucf101(videos, splits)
    assert len(index.train) == 4
    assert any("2 of 6" in record.getMessage() for record in caplog.records)


def test_ucf101_errors_name_the_problem(ucf, tmp_path):
    videos, splits = ucf
    with pytest.raises(LayoutError, match="nowhere"):
        load_ucf101(tmp_path / "nowhere", splits)
    (splits / "testlist02.txt").unlink()
    with pytest.raises(LayoutError, match="testlist02.txt"):
        load_ucf101(videos, splits, fold=2)
    write(splits / "trainlist03.txt", "YoYo/v_YoYo_g01_c01.avi 2\n")  # label of another class
    with pytest.raises(LayoutError, match=r"trainlist03.txt:1"):
        load_ucf101(videos, splits, fold=3)
    write(splits / "classInd.txt", "1 YoYo\nApplyEyeMakeup\n")
    with pytest.raises(LayoutError, match=r"classInd.txt:2"):
        load_ucf101(videos, splits)


# ----------------------------------------------------------------------------- HMDB-51


@pytest.fixture
def hmdb(tmp_path) -> tuple[Path, Path]:
    videos, splits = tmp_path / "hmdb51", tmp_path / "splits"
    for name in ("wave", "brush_hair"):
        lines = []
        for i, tag in enumerate((1, 1, 2, 0)):
            video = f"April_09_{name}_u_nm_np1_ba_goo_{i}.avi" if i < 2 else f"Other_{name}_clip_{i}.avi"
            touch(videos / name / video)
            lines.append(f"{video} {tag} \n")
        write(splits / f"{name}_test_split1.txt", "".join(lines))
        write(splits / f"{name}_test_split2.txt", "".join(line.replace(" 1 ", " 2 ") for line in lines))
    touch(videos / "no_split_file" / "x.avi")
    return videos, splits


def test_hmdb51_tags_and_groups(hmdb):
    index = load_hmdb51(*hmdb)
    assert index.classes == ["brush_hair", "wave"]
    assert sorted(names(index.train)) == sorted(
        f"April_09_{n}_u_nm_np1_ba_goo_{i}.avi" for n in ("wave", "brush_hair") for i in (0, 1)
    )
    assert sorted(names(index.test)) == ["Other_brush_hair_clip_2.avi", "Other_wave_clip_2.avi"]
    assert {s.group for s in index.train} == {"April_09_wave_u_nm_np1_ba_goo", "April_09_brush_hair_u_nm_np1_ba_goo"}
    assert {s.group for s in index.test} == {"Other_wave_clip", "Other_brush_hair_clip"}
    assert all(Path(s.path).parent.name == index.classes[s.label] for s in index.train + index.test)


def test_hmdb51_fold_and_errors(hmdb):
    assert load_hmdb51(*hmdb, fold=2).train == []
    with pytest.raises(LayoutError, match="split3"):
        load_hmdb51(*hmdb, fold=3)
    with pytest.raises(LayoutError, match="fold"):
        load_hmdb51(*hmdb, fold=5)
    write(hmdb[1] / "wave_test_split1.txt", "clip.avi 7\n")
    with pytest.raises(LayoutError, match=r"wave_test_split1.txt:1"):
        load_hmdb51(*hmdb)


# ----------------------------------------------------------------------------- class folders


@pytest.fixture
def folders(tmp_path) -> Path:
    root = tmp_path / "videos"
    for name in ("walk", "run", "jump"):
        for group in range(20):
            for clip in range(3):
                touch(root / name / f"v_{name}_g{group:02d}_c{clip:02d}.mp4")
    touch(root / "walk" / "notes.txt")
    touch(root / "extra" / "solo_take.MKV")
    (root / "empty").mkdir()
    return root


def test_class_folders_classes_and_extensions(folders):
    index = load_class_folders(folders)
    assert index.classes == ["extra", "jump", "run", "walk"]
    everything = index.train + index.test
    assert len(everything) == 3 * 20 * 3 + 1
    assert not any(path.endswith(".txt") for path in names(everything))
    assert {s.group for s in everything if s.label == 0} == {"solo_take"}
    assert all(Path(s.path).parent.name == index.classes[s.label] for s in everything)


def test_class_folders_split_is_deterministic_by_group(folders):
    first, second = load_class_folders(folders, 0.3), load_class_folders(folders, 0.3)
    assert first == second
    train_groups, test_groups = {s.group for s in first.train}, {s.group for s in first.test}
    assert not train_groups & test_groups
    assert test_groups  # the split happened
    # 21 groups at 0.3: a wildly off fraction means the hash is not used as a uniform number
    assert 0.1 < len(test_groups) / len(train_groups | test_groups) < 0.6


def test_segments_in_a_subfolder_stay_on_one_side(tmp_path):
    """Segments cut from one recording, kept in a subfolder of their own, are one group: they never
    land in train and test both (as files named seg001.mp4, seg002.mp4 ... would, each its own group)."""
    root = tmp_path / "videos"
    for name in ("cooking", "juggling"):
        for recording in range(12):
            for segment in range(4):
                touch(root / name / f"recording{recording:02d}" / f"seg{segment:03d}.mp4")
    touch(root / "cooking" / "single.mp4")
    touch(root / "cooking" / "take2" / "v_cooking_g07_c01.mp4")  # _gNN_ in the name still decides
    index = load_class_folders(root, 0.3)
    groups = {Path(s.path).relative_to(root).as_posix(): s.group for s in index.train + index.test}
    assert groups["cooking/recording03/seg002.mp4"] == "cooking/recording03"
    assert groups["juggling/recording03/seg000.mp4"] == "juggling/recording03"  # not cooking's recording03
    assert groups["cooking/single.mp4"] == "single" and groups["cooking/take2/v_cooking_g07_c01.mp4"] == "g07"
    assert not {s.group for s in index.train} & {s.group for s in index.test}
    assert index.test  # the split happened


def test_class_folders_hash_split_by_path(folders):
    index = load_class_folders(folders, 0.25, split_by="hash")
    groups_on_both_sides = {s.group for s in index.train} & {s.group for s in index.test}
    assert groups_on_both_sides  # per-file split ignores groups
    assert 0.15 < len(index.test) / (len(index.train) + len(index.test)) < 0.35
    assert load_class_folders(folders, 0.0).test == [] and load_class_folders(folders, 1.0).train == []


def test_class_folders_errors(folders, tmp_path):
    with pytest.raises(LayoutError):
        load_class_folders(folders, split_by="random")
    with pytest.raises(LayoutError):
        load_class_folders(folders, test_fraction=1.5)
    with pytest.raises(LayoutError, match="no class folder"):
        load_class_folders(tmp_path / "videos" / "empty")


# ----------------------------------------------------------------------------- manifest


def test_manifest_with_split_and_group(tmp_path):
    for name in ("a.mp4", "b.mp4", "sub/c.mp4"):
        touch(tmp_path / "data" / name)
    absolute = touch(tmp_path / "elsewhere" / "d.avi")
    csv_path = write(
        tmp_path / "data" / "manifest.csv",
        "path,label,split,group\n"
        "a.mp4,walk,train,alice\n"
        "b.mp4,run,TEST,\n"
        f"sub/c.mp4,walk,train,alice\n"
        f"{absolute},jump,test,bob\n",
    )
    index = load_manifest(csv_path)
    assert index.classes == ["jump", "run", "walk"]
    assert [(Path(s.path), s.label, s.group) for s in index.train] == [
        (tmp_path / "data" / "a.mp4", 2, "alice"),
        (tmp_path / "data" / "sub" / "c.mp4", 2, "alice"),
    ]
    assert [(Path(s.path), s.label, s.group) for s in index.test] == [
        (tmp_path / "data" / "b.mp4", 1, "b"),
        (absolute, 0, "bob"),
    ]


def test_manifest_without_split_uses_group_hash(tmp_path):
    rows = []
    for group in range(30):
        for clip in range(2):
            touch(tmp_path / f"{group}_{clip}.mp4")
            rows.append(f"{group}_{clip}.mp4,{'even' if group % 2 == 0 else 'odd'},person{group}\n")
    csv_path = write(tmp_path / "m.csv", "path,label,group\n" + "".join(rows))
    index = load_manifest(csv_path, test_fraction=0.3)
    assert index == load_manifest(csv_path, test_fraction=0.3)
    assert not {s.group for s in index.train} & {s.group for s in index.test}
    assert 0.1 < len(index.test) / 60 < 0.6


def test_manifest_errors_name_file_and_line(tmp_path):
    touch(tmp_path / "a.mp4")
    with pytest.raises(LayoutError, match="label"):
        load_manifest(write(tmp_path / "m1.csv", "path,split\na.mp4,train\n"))
    with pytest.raises(LayoutError, match=r"m2.csv:3"):
        load_manifest(write(tmp_path / "m2.csv", "path,label,split\na.mp4,x,train\na.mp4,x,validation\n"))
    with pytest.raises(LayoutError, match=r"m3.csv:2"):
        load_manifest(write(tmp_path / "m3.csv", "path,label\n,x\n"))
    with pytest.raises(LayoutError, match="missing.csv"):
        load_manifest(tmp_path / "missing.csv")

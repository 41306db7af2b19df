"""Decoding must return exactly the requested frames: each test frame carries its index as a barcode."""

from __future__ import annotations

import random
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest

from datasets.video_io import (
    VideoDecodeError,
    _decode_wanted,
    clip_frame_indices,
    decode_frames,
    probe_video,
    random_clip_start,
    uniform_clip_starts,
    write_video,
)

NUM_FRAMES = 40
SIZE = 64
BAR_WIDTH = SIZE // 8  # 8 bars, one per bit; 8 px matches the codecs' transform blocks


def barcode_frames(num_frames: int) -> np.ndarray:
    """Frames whose 8 vertical bars spell the frame index in binary (white = 1, least significant bit left)."""
    frames = np.zeros((num_frames, SIZE, SIZE, 3), np.uint8)
    for index in range(num_frames):
        for bit in range(8):
            if index >> bit & 1:
                frames[index, :, bit * BAR_WIDTH : (bit + 1) * BAR_WIDTH] = 255
    return frames


def read_barcodes(frames: np.ndarray) -> list[int]:
    """Frame indices read back from the bars' centres (robust to compression and resizing)."""
    height, width = frames.shape[1:3]
    bar = width / 8
    indices = []
    for frame in frames:
        rows = frame[height // 4 : -height // 4]
        bits = [rows[:, int((b + 0.3) * bar) : int((b + 0.7) * bar)].mean() > 128 for b in range(8)]
        indices.append(sum(int(is_set) << b for b, is_set in enumerate(bits)))
    return indices


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    frames = barcode_frames(NUM_FRAMES)
    paths = {
        "mpeg4.avi": ("mpeg4", 8),
        "h264.mp4": ("libx264", 8),  # x264 uses B-frames: packets arrive out of presentation order
        "h264_long_gop.mp4": ("libx264", 250),
        "mpeg4.mkv": ("mpeg4", 8),  # Matroska has no frame count in its header
    }
    for name, (codec, gop) in paths.items():
        write_video(folder / name, frames, fps=25, codec=codec, gop_size=gop)
    result = {name: folder / name for name in paths}
    write_video(folder / "short.avi", barcode_frames(5))
    result["short.avi"] = folder / "short.avi"
    return result


VIDEO_NAMES = ["mpeg4.avi", "h264.mp4", "h264_long_gop.mp4", "mpeg4.mkv"]
INDEX_LISTS = [
    [0],
    [0, 1, 2, 3],
    [5, 6, 7, 8, 9, 10],  # crosses the keyframe at 8
    [20],
    [9, 10, 11],  # starts just after a keyframe
    [3, 13, 23, 33],  # strided across several GOPs
    [10, 10, 11, 11],  # repeated
    [36, 37, 38, 39, 39, 39],  # padded at the end
    [39],
]


def test_barcode_roundtrip_without_codec():
    assert read_barcodes(barcode_frames(NUM_FRAMES)) == list(range(NUM_FRAMES))


@pytest.mark.parametrize("name", VIDEO_NAMES)
@pytest.mark.parametrize("indices", INDEX_LISTS, ids=str)
def test_decode_returns_exactly_the_requested_frames(videos, name, indices):
    frames = decode_frames(videos[name], indices)
    assert frames.dtype == np.uint8
    assert frames.shape == (len(indices), SIZE, SIZE, 3)
    assert read_barcodes(frames) == indices


@pytest.mark.parametrize("name", VIDEO_NAMES)
def test_probe_reports_count_fps_size(videos, name):
    assert probe_video(videos[name]) == probe_video(str(videos[name]))
    info = probe_video(videos[name])
    assert (info.num_frames, info.fps, info.width, info.height) == (NUM_FRAMES, 25.0, SIZE, SIZE)


def test_mkv_frame_count_comes_from_packets(videos):
    # Guards that the packet-counting branch of probe_video is what the mkv test exercises.
    with av.open(str(videos["mpeg4.mkv"])) as container:
        assert container.streams.video[0].frames == 0


@pytest.mark.parametrize("size", [(32, 48), (96, 80)])
def test_decode_resizes_to_height_width(videos, size):
    frames = decode_frames(videos["mpeg4.avi"], [4, 12, 12], size=size)
    assert frames.shape == (3, *size, 3)
    assert read_barcodes(frames) == [4, 12, 12]


def test_short_video_is_padded_with_its_last_frame(videos):
    info = probe_video(videos["short.avi"])
    assert info.num_frames == 5
    start = random_clip_start(info.num_frames, clip_len=8, stride=2, rng=np.random.default_rng(0))
    assert start == 0
    indices = clip_frame_indices(info.num_frames, clip_len=8, stride=2, start=start)
    assert indices == [0, 2, 4, 4, 4, 4, 4, 4]
    assert read_barcodes(decode_frames(videos["short.avi"], indices)) == indices


def test_clip_frame_indices():
    assert clip_frame_indices(100, 4, 1, 10) == [10, 11, 12, 13]
    assert clip_frame_indices(100, 4, 3, 10) == [10, 13, 16, 19]
    assert clip_frame_indices(12, 4, 3, 5) == [5, 8, 11, 11]
    with pytest.raises(ValueError):
        clip_frame_indices(10, 4, 1, 10)
    with pytest.raises(ValueError):
        clip_frame_indices(10, 0, 1, 0)


def test_uniform_clip_starts():
    # span 16 in 100 frames: starts 0..84, three segments of 28 with centres 14, 42, 70
    assert uniform_clip_starts(100, 16, 1, 3) == [14, 42, 70]
    assert uniform_clip_starts(100, 16, 1, 1) == [42]
    starts = uniform_clip_starts(100, 8, 4, 5)  # span 29, last valid start 71
    assert starts == sorted(starts) and 0 <= starts[0] and starts[-1] <= 71 and len(set(starts)) == 5
    # Fewer valid starts than clips: each start once, never a repeated clip.
    assert uniform_clip_starts(10, 16, 1, 3) == [0]
    assert uniform_clip_starts(16, 16, 1, 2) == [0]  # the case: 16 frames, clip-len 16
    assert uniform_clip_starts(17, 16, 1, 3) == [0, 1]
    assert uniform_clip_starts(18, 16, 1, 3) == [0, 1, 2]
    for num_frames in range(1, 80):
        for num_clips in range(1, 7):
            starts = uniform_clip_starts(num_frames, 8, 2, num_clips)
            assert len(set(starts)) == len(starts) == min(num_clips, max(num_frames - 15, 0) + 1)


@pytest.mark.parametrize("rng", [random.Random(0), np.random.default_rng(0)], ids=["random", "numpy"])
def test_random_clip_start_covers_valid_range(rng):
    starts = {random_clip_start(20, 8, 2, rng) for _ in range(500)}  # span 15: starts 0..5
    assert starts == set(range(6))
    assert random_clip_start(10, 8, 2, rng) == 0


class _OvershootingContainer:
    """Stands in for a file whose index makes every seek land on the keyframe after the target."""

    def __init__(self, frames: np.ndarray):
        self.frames = frames
        self.position = 0
        self.seeks: list[int] = []

    def seek(self, pts: int, stream, backward: bool, any_frame: bool) -> None:
        self.seeks.append(pts)
        self.position = 0 if pts == 0 else (pts // 8 + 1) * 8

    def decode(self, stream):
        for index in range(self.position, len(self.frames)):
            frame = av.VideoFrame.from_ndarray(self.frames[index], format="rgb24")
            frame.pts = index
            yield frame


def test_seek_past_the_first_wanted_frame_falls_back_to_decoding_from_the_start():
    stream = SimpleNamespace(average_rate=Fraction(25), time_base=Fraction(1, 25), start_time=0)
    container = _OvershootingContainer(barcode_frames(NUM_FRAMES))
    frames = _decode_wanted(container, stream, Path("fake.avi"), [5, 9], size=None)
    assert container.seeks == [5, 0]
    assert {index: read_barcodes(frame[None])[0] for index, frame in frames.items()} == {5: 5, 9: 9}


def test_decode_rejects_bad_index_lists(videos):
    with pytest.raises(ValueError):
        decode_frames(videos["mpeg4.avi"], [])
    with pytest.raises(ValueError):
        decode_frames(videos["mpeg4.avi"], [5, 4])


def test_index_past_the_end_raises(videos):
    with pytest.raises(VideoDecodeError, match="mpeg4.avi"):
        decode_frames(videos["mpeg4.avi"], [38, 39, 40])


def _bad_file(tmp_path: Path, kind: str) -> Path:
    if kind == "missing":
        return tmp_path / "missing.avi"
    if kind == "directory":
        (tmp_path / "dir.avi").mkdir()
        return tmp_path / "dir.avi"
    contents = {
        "empty": b"",
        "random": np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes(),
        "text": b"this is not a video\n" * 100,
    }[kind]
    path = tmp_path / f"{kind}.avi"
    path.write_bytes(contents)
    return path


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "random", "text"])
def test_bad_files_raise_video_decode_error_naming_the_file(tmp_path, kind):
    path = _bad_file(tmp_path, kind)
    with pytest.raises(VideoDecodeError, match=path.name):
        probe_video(path)
    with pytest.raises(VideoDecodeError, match=path.name):
        decode_frames(path, [0, 1])


def _truncate(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def test_truncated_avi_decodes_early_frames_and_raises_on_late_ones(tmp_path):
    # Noise makes the frame data dwarf the AVI header, so half the file holds about half the frames.
    noise = np.random.default_rng(0).integers(-40, 41, (NUM_FRAMES, SIZE, SIZE, 3))
    noisy = np.clip(barcode_frames(NUM_FRAMES) + noise, 0, 255).astype(np.uint8)
    write_video(tmp_path / "noisy.avi", noisy)
    path = _truncate(tmp_path / "noisy.avi", tmp_path / "half.avi")
    assert probe_video(path).num_frames == NUM_FRAMES  # the header still promises every frame
    assert read_barcodes(decode_frames(path, [0, 1, 2])) == [0, 1, 2]
    with pytest.raises(VideoDecodeError, match="half.avi"):
        decode_frames(path, [36, 37, 38, 39])


def test_truncated_mp4_raises(videos, tmp_path):
    # Without faststart the mp4 index (moov) is at the end: half a file cannot be opened at all.
    path = _truncate(videos["h264.mp4"], tmp_path / "half.mp4")
    with pytest.raises(VideoDecodeError, match="half.mp4"):
        probe_video(path)
    with pytest.raises(VideoDecodeError, match="half.mp4"):
        decode_frames(path, [30, 31])

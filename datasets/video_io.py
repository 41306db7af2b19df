"""Video file I/O with PyAV: probing, clip index sampling, clip decoding and writing."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter


class VideoDecodeError(Exception):
    """A video file could not be opened or decoded (corrupt, truncated, empty, not a video)."""


@dataclass(frozen=True)
class VideoInfo:
    """Metadata of a file's first video stream."""

    num_frames: int
    fps: float
    width: int
    height: int


# Everything PyAV/FFmpeg or the OS raises on a bad file. PyAV's errors subclass FFmpegError and,
# for most codes, also the matching builtin (OSError, ValueError, EOFError, ...).
_FILE_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError, RuntimeError)


@contextmanager
def _decode_errors_named(path: Path) -> Iterator[None]:
    """Re-raise any file-level error as VideoDecodeError naming the file and the cause."""
    try:
        yield
    except VideoDecodeError:
        raise
    except _FILE_ERRORS as error:
        raise VideoDecodeError(f"{path}: {type(error).__name__}: {error}") from error


def _first_video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise VideoDecodeError(f"{path}: no video stream")
    return container.streams.video[0]


def _stream_fps(stream: av.video.stream.VideoStream, path: Path) -> Fraction:
    fps = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not fps or fps <= 0:
        raise VideoDecodeError(f"{path}: unknown frame rate")
    return Fraction(fps)


def probe_video(path: str | Path) -> VideoInfo:
    """Read frame count, fps and size of the first video stream without decoding pixels.

    The frame count comes from the container header when it has one, else from counting the
    stream's packets (e.g. Matroska/WebM). Any problem with the file raises VideoDecodeError.
    """
    path = Path(path)
    with _decode_errors_named(path):
        with av.open(str(path)) as container:
            stream = _first_video_stream(container, path)
            fps = _stream_fps(stream, path)
            width, height = stream.codec_context.width, stream.codec_context.height
            num_frames = stream.frames
            if num_frames <= 0:
                # Flush packets (size 0) carry no frame.
                num_frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
    if num_frames <= 0:
        raise VideoDecodeError(f"{path}: video stream has no frames")
    if width <= 0 or height <= 0:
        raise VideoDecodeError(f"{path}: video stream has no frame size")
    return VideoInfo(num_frames=num_frames, fps=float(fps), width=width, height=height)


def clip_span(clip_len: int, stride: int) -> int:
    """Number of source frames covered by a clip of ``clip_len`` frames taken every ``stride``."""
    if clip_len < 1 or stride < 1:
        raise ValueError(f"clip_len and stride must be >= 1, got {clip_len}, {stride}")
    return (clip_len - 1) * stride + 1


def _max_clip_start(num_frames: int, clip_len: int, stride: int) -> int:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return max(num_frames - clip_span(clip_len, stride), 0)


def clip_frame_indices(num_frames: int, clip_len: int, stride: int, start: int) -> list[int]:
    """Frame indices ``start, start+stride, ...`` of one clip (``clip_len`` of them).

    Videos shorter than the clip span are padded by repeating their last frame: indices past
    the end are clamped to ``num_frames - 1``, so every clip has exactly ``clip_len`` frames.
    """
    clip_span(clip_len, stride)
    if not 0 <= start < num_frames:
        raise ValueError(f"start {start} outside a video of {num_frames} frames")
    return [min(start + k * stride, num_frames - 1) for k in range(clip_len)]


def uniform_clip_starts(num_frames: int, clip_len: int, stride: int, num_clips: int) -> list[int]:
    """Distinct start indices of up to ``num_clips`` clips spread uniformly over the video.

    The valid start range ``[0, num_frames - span]`` is cut into ``num_clips`` equal segments and
    each clip starts at a segment's centre (one clip is centred in the video). A video with no more
    valid starts than ``num_clips`` gets each of them once (one clip, start 0, when it is shorter
    than a clip span): a repeated clip would weigh its frames twice in the video's average.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    max_start = _max_clip_start(num_frames, clip_len, stride)
    if max_start + 1 <= num_clips:
        return list(range(max_start + 1))
    # Segments at least one frame wide: centres rounded half up are distinct (Python's round()
    # rounds half to even and would put 0.5·3/3 and 2.5 both on 2).
    return [math.floor(max_start * (k + 0.5) / num_clips + 0.5) for k in range(num_clips)]


def random_clip_start(num_frames: int, clip_len: int, stride: int, rng: random.Random | np.random.Generator) -> int:
    """A uniformly random valid clip start (0 when the video is shorter than a clip span)."""
    max_start = _max_clip_start(num_frames, clip_len, stride)
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(0, max_start + 1))
    return rng.randint(0, max_start)


def resized_shape(height: int, width: int, resize: tuple[int, int] | int | None) -> tuple[int, int]:
    """The ``(height, width)`` a ``height×width`` frame gets under ``resize``.

    A tuple is the exact ``(height, width)``; an int N is the short side (torchvision's convention
    for an int size: the smaller edge becomes N, the longer ``int(N * long / short)``, so the aspect
    ratio is kept up to rounding down); None keeps the native size.
    """
    if resize is None:
        return height, width
    if isinstance(resize, int):
        if resize < 1 or height < 1 or width < 1:
            raise ValueError(f"short side and frame size must be positive, got {resize} for {height}x{width}")
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(resize * long / short)
        return (new_long, resize) if width <= height else (resize, new_long)
    new_height, new_width = resize
    return int(new_height), int(new_width)


def decode_frames(
    path: str | Path, frame_indices: Sequence[int], size: tuple[int, int] | int | None = None
) -> np.ndarray:
    """Decode the given frames as a uint8 RGB array ``T×H×W×3`` with ``T == len(frame_indices)``.

    ``frame_indices`` must be non-decreasing and may repeat (padded clips). ``size=(height, width)``
    resizes (bilinear) to exactly that; an int resizes the short side to it, keeping the aspect
    ratio (see :func:`resized_shape`); None keeps the native size. Decoding starts at the keyframe
    before the first index and stops after the last one. Raises VideoDecodeError if the file cannot be decoded or
    some requested frame never comes out (truncated file, index past the end).
    """
    indices = [int(i) for i in frame_indices]
    if not indices:
        raise ValueError("frame_indices is empty")
    if indices[0] < 0 or any(b < a for a, b in zip(indices, indices[1:])):
        raise ValueError(f"frame_indices must be non-negative and non-decreasing, got {indices}")
    path = Path(path)
    with _decode_errors_named(path):
        with av.open(str(path)) as container:
            stream = _first_video_stream(container, path)
            frames = _decode_wanted(container, stream, path, sorted(set(indices)), _output_size(stream, path, size))
    missing = sorted(set(indices) - frames.keys())
    if missing:
        raise VideoDecodeError(
            f"{path}: {len(missing)} requested frames not decoded (first {missing[0]}); "
            "truncated or corrupt file, or index past the end"
        )
    return np.stack([frames[i] for i in indices])


def _output_size(
    stream: av.video.stream.VideoStream, path: Path, size: tuple[int, int] | int | None
) -> tuple[int, int] | None:
    """``size`` as an exact ``(height, width)`` (None: native): a short side needs the stream's frame size."""
    if not isinstance(size, int):
        return size
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        raise VideoDecodeError(f"{path}: video stream has no frame size")
    return resized_shape(height, width, size)


def _decode_wanted(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    path: Path,
    wanted: list[int],
    size: tuple[int, int] | None,
) -> dict[int, np.ndarray]:
    """Decode forward from the keyframe before ``wanted[0]``, keeping the wanted frames by index."""
    fps = _stream_fps(stream, path)
    start_pts = stream.start_time or 0
    first_pts = start_pts + int(wanted[0] / (fps * stream.time_base)) if wanted[0] > 0 else None
    # A broken or coarse index can land the seek after the first wanted frame: then decode again
    # from the start, slower but exact.
    for seek_pts in (first_pts, start_pts):
        if seek_pts is not None:
            container.seek(seek_pts, stream=stream, backward=True, any_frame=False)
        frames = _collect_frames(container, stream, wanted, start_pts, fps, size)
        if frames is not None:
            return frames
    return {}


def _collect_frames(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    wanted: list[int],
    start_pts: int,
    fps: Fraction,
    size: tuple[int, int] | None,
) -> dict[int, np.ndarray] | None:
    """Decoded frames whose index is in ``wanted``; None if decoding started past ``wanted[0]``."""
    height, width = size if size is not None else (None, None)
    wanted_set = set(wanted)
    # One reformatter reused for the clip: its scaler context is cached between frames.
    reformatter = VideoReformatter()
    frames: dict[int, np.ndarray] = {}
    index = -1
    for frame in container.decode(stream):
        # Frames without a timestamp are taken to follow the previous one.
        index = round((frame.pts - start_pts) * stream.time_base * fps) if frame.pts is not None else index + 1
        if not frames and index > wanted[0]:
            return None
        if index in wanted_set and index not in frames:
            rgb = reformatter.reformat(frame, width=width, height=height, format="rgb24")
            frames[index] = rgb.to_ndarray()
        if index >= wanted[-1]:
            break
    return frames


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: int = 25,
    codec: str = "mpeg4",
    gop_size: int = 8,
    quality: int = 2,
) -> None:
    """Write uint8 RGB frames ``T×H×W×3`` as a video file (container chosen by suffix).

    A short GOP keeps keyframes close together so that seeking to a random clip start is cheap.
    ``quality`` is the MPEG-4 quantizer (1 best .. 31 worst); it is ignored by other codecs.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 T×H×W×3, got {frames.dtype} {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part" + path.suffix)
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = int(frames.shape[2])
        stream.height = int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop_size
        if codec == "mpeg4":
            stream.codec_context.qmin = quality
            stream.codec_context.qmax = quality
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)

"""Decode video to RGB frames on a constant working frame rate.

ffmpeg does the work: it applies the rotation metadata (autorotate), resamples any input timing,
variable frame rates included, to ``fps`` with the first output frame at time zero of the file
timeline (``fps=...:start_time=0``, so a video stream that starts late repeats its first frame
instead of shifting everything by the offset and losing sync with the audio), then crops and
scales. Frames stream through a pipe, one at a time: memory does not grow with the video length.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Iterator

import ffmpeg
import numpy as np

from ..errors import InputError
from .ffmpeg import Reader
from .probe import MediaInfo


@dataclasses.dataclass(frozen=True)
class CropBox:
    """A square (or rectangular) box in displayed source pixels."""

    x: int
    y: int
    w: int
    h: int

    def as_list(self) -> list[int]:
        return [self.x, self.y, self.w, self.h]


def fps_fraction(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(10000)


def frame_size(info: MediaInfo, crop: CropBox | None, size: int | tuple[int, int] | None,
               max_side: int | None) -> tuple[int, int]:
    """Output (width, height) for the given crop/scale choices."""
    assert info.video is not None
    w, h = (crop.w, crop.h) if crop else (info.video.width, info.video.height)
    if size is not None:
        return (size, size) if isinstance(size, int) else size
    if max_side and max(w, h) > max_side:
        s = max_side / max(w, h)
        w, h = max(2, int(round(w * s / 2)) * 2), max(2, int(round(h * s / 2)) * 2)
    return w, h


def iter_frames(
    info: MediaInfo,
    fps: float,
    *,
    crop: CropBox | None = None,
    size: int | tuple[int, int] | None = None,
    max_side: int | None = None,
    n_frames: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield exactly ``n_frames`` (default: ``info.frame_count(fps)``) HxWx3 uint8 RGB frames.

    If the decoder delivers a frame or two fewer than the timeline asks for (rounding at the end
    of the stream), the last frame is repeated; more missing frames mean a damaged file.
    """
    if info.video is None:
        raise InputError(f"{info.path} has no video stream")
    n = info.frame_count(fps) if n_frames is None else n_frames
    w, h = frame_size(info, crop, size, max_side)
    stream = ffmpeg.input(info.path).video.filter("fps", fps=str(fps_fraction(fps)), start_time=0)
    if crop is not None:
        stream = stream.filter("crop", crop.w, crop.h, crop.x, crop.y)
    stream = stream.filter("scale", w, h, flags="lanczos+accurate_rnd+full_chroma_int")
    out = stream.output("pipe:", format="rawvideo", pix_fmt="rgb24", vframes=n)
    frame_bytes = w * h * 3
    count = 0
    last = None
    with Reader(out, f"decoding {info.path}") as reader:
        for buf in reader.records(frame_bytes):
            if len(buf) < frame_bytes:
                break
            last = np.frombuffer(buf, np.uint8).reshape(h, w, 3)
            count += 1
            yield last
            if count >= n:
                break
    missing = n - count
    tolerance = max(2, int(0.01 * n))
    if last is None or missing > tolerance:
        raise InputError(
            f"{info.path}: decoded only {count} of {n} frames; the file is truncated or damaged"
        )
    for _ in range(missing):
        yield last

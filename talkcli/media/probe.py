"""Probe media files with PyAV (the bundled ffmpeg has no ffprobe).

Stream times come from demuxed packet timestamps rather than header durations, so that
variable-frame-rate files and streams that start late are described exactly. All times are in
seconds on the file's timeline with its origin at the container start (the earliest stream),
which is also where ffmpeg's command line puts time zero: frame i of the working frame rate is
at i / fps and audio sample n at n / sr on this same timeline.
"""

from __future__ import annotations

import dataclasses
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ..errors import InputError


@dataclasses.dataclass
class VideoInfo:
    index: int
    codec: str
    width: int  # as displayed, after rotation
    height: int
    coded_width: int
    coded_height: int
    rotation: int  # degrees of the display matrix
    avg_fps: float
    start: float  # first frame time on the file timeline (s)
    end: float  # end of the last frame (s)
    frames: int  # packets = coded frames
    vfr: bool
    pix_fmt: str | None

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclasses.dataclass
class AudioInfo:
    index: int
    codec: str
    sample_rate: int
    channels: int
    sample_format: str
    bits: int | None  # for PCM: the stored bit depth
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclasses.dataclass
class MediaInfo:
    path: str
    format: str
    size_bytes: int
    origin: float  # container start on the stream clocks; our time zero
    duration: float
    video: VideoInfo | None
    audio: AudioInfo | None

    def frame_count(self, fps: float) -> int:
        """Frames of a constant-rate ``fps`` timeline that covers the video from time zero."""
        if self.video is None:
            return 0
        return max(1, int(round(self.video.end * float(Fraction(fps).limit_denominator(10000)))))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_PCM_BITS = {"pcm_s16le": 16, "pcm_s16be": 16, "pcm_s24le": 24, "pcm_s24be": 24, "pcm_s32le": 32,
             "pcm_s32be": 32, "pcm_u8": 8, "pcm_f32le": 32, "pcm_f64le": 64}


def probe(path: str | os.PathLike) -> MediaInfo:
    path = Path(path)
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if not path.is_file():
        raise InputError(f"input is not a file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"input is empty: {path}")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read {path.name}: not a media file, or truncated/corrupt ({_why(exc)})") from exc
    with container:
        vstreams = [s for s in container.streams if s.type == "video" and not _is_cover_art(s)]
        astreams = [s for s in container.streams if s.type == "audio"]
        vs = vstreams[0] if vstreams else None
        as_ = astreams[0] if astreams else None
        origin = container.start_time / av.time_base if container.start_time is not None else 0.0

        vpts: list[int] = []
        vdur: list[int] = []
        a_first = a_end = None
        wanted = [s for s in (vs, as_) if s is not None]
        if not wanted:
            raise InputError(f"{path.name} has no video or audio stream")
        try:
            for pkt in container.demux(*wanted):
                if pkt.pts is None or pkt.size == 0:
                    continue
                if vs is not None and pkt.stream.index == vs.index:
                    vpts.append(pkt.pts)
                    vdur.append(pkt.duration or 0)
                elif as_ is not None and pkt.stream.index == as_.index:
                    t0 = float(pkt.pts * pkt.time_base)
                    t1 = t0 + float((pkt.duration or 0) * pkt.time_base)
                    a_first = t0 if a_first is None else min(a_first, t0)
                    a_end = t1 if a_end is None else max(a_end, t1)
        except av.error.FFmpegError as exc:
            raise InputError(f"cannot read {path.name}: truncated or corrupt ({_why(exc)})") from exc

        video = None
        if vs is not None:
            if not vpts:
                raise InputError(f"{path.name}: the video stream holds no frames (truncated?)")
            promised = int(vs.frames or 0)  # from the container index, when it has one
            if promised and len(vpts) < promised - max(2, promised // 100):
                raise InputError(f"{path.name} is truncated or damaged: its index lists {promised} video frames "
                                 f"but the file holds {len(vpts)}")
            video = _video_info(container, vs, np.array(vpts), np.array(vdur), origin)
        audio = None
        if as_ is not None and a_first is not None:
            cc = as_.codec_context
            audio = AudioInfo(
                index=as_.index,
                codec=cc.name,
                sample_rate=int(cc.sample_rate),
                channels=int(cc.channels) if hasattr(cc, "channels") else len(cc.layout.channels),
                sample_format=cc.format.name if cc.format else "unknown",
                bits=_PCM_BITS.get(cc.name),
                start=a_first - origin,
                end=a_end - origin,
            )
        duration = container.duration / av.time_base if container.duration else max(
            (video.end if video else 0.0), (audio.end if audio else 0.0))
        return MediaInfo(
            path=str(path.resolve()),
            format=container.format.name,
            size_bytes=size,
            origin=origin,
            duration=duration,
            video=video,
            audio=audio,
        )


def _video_info(container, vs, pts: np.ndarray, dur: np.ndarray, origin: float) -> VideoInfo:
    tb = float(vs.time_base)
    order = np.argsort(pts)
    pts, dur = pts[order], dur[order]
    deltas = np.diff(pts)
    deltas = deltas[deltas > 0]
    typical = float(np.median(deltas)) if deltas.size else float(dur[0] or 1)
    last_dur = dur[-1] if dur[-1] > 0 else typical
    start = pts[0] * tb - origin
    end = (pts[-1] + last_dur) * tb - origin
    # Variable frame rate: frame intervals that differ by more than 1% and a tick from the median.
    vfr = bool(deltas.size and np.mean(np.abs(deltas - typical) > max(1.0, 0.01 * typical)) > 0.02)
    n = len(pts)
    avg_fps = (n / (end - start)) if end > start else float(vs.average_rate or 0)
    cc = vs.codec_context
    rotation = _rotation(container, vs)
    w, h = int(cc.width), int(cc.height)
    dw, dh = (h, w) if rotation % 180 == 90 else (w, h)
    return VideoInfo(
        index=vs.index,
        codec=cc.name,
        width=dw,
        height=dh,
        coded_width=w,
        coded_height=h,
        rotation=rotation,
        avg_fps=round(avg_fps, 4),
        start=round(start, 6),
        end=round(end, 6),
        frames=n,
        vfr=vfr,
        pix_fmt=cc.pix_fmt,
    )


def _rotation(container, vs) -> int:
    """Display rotation in degrees (0, 90, 180, 270), read from the first decoded frame."""
    try:
        container.seek(0, stream=vs)
        for frame in container.decode(vs):
            rot = getattr(frame, "rotation", 0) or 0
            return int(round(rot)) % 360
    except av.error.FFmpegError:
        return 0
    return 0


def _is_cover_art(stream) -> bool:
    disp = getattr(stream, "disposition", None)
    try:
        return bool(disp and (int(disp) & 0x400))  # AV_DISPOSITION_ATTACHED_PIC
    except (TypeError, ValueError):
        return False


def _why(exc: Exception) -> str:
    msg = getattr(exc, "strerror", None) or str(exc)
    return msg.split(":")[-1].strip() if ":" in msg else msg.strip()


def duration_str(seconds: float) -> str:
    m, s = divmod(max(0.0, seconds), 60)
    return f"{int(m)}:{s:05.2f}" if m else f"{s:.2f} s"


__all__ = ["AudioInfo", "MediaInfo", "VideoInfo", "duration_str", "probe"]

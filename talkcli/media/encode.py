"""Encode H.264 MP4 from streamed RGB frames, with audio muxed in sync.

Frames go to ffmpeg's stdin one at a time (no whole video in memory). The output is yuv420p
(what every player decodes) with even dimensions (yuv420p needs them; odd sizes are padded by one
pixel), ``+faststart`` for web playback, and is written to a temporary file that replaces the
target only when ffmpeg succeeded. Audio, when given, starts at frame 0 and is cut to the video.
"""

from __future__ import annotations

import errno
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path

import ffmpeg
import numpy as np

from ..errors import InputError, TalkError, UsageError, storage_error
from ..workspace import atomic_path
from .ffmpeg import _last_error_line, compile_args


class VideoWriter:
    """``with VideoWriter(path, fps, (w, h), audio=wav) as vw: vw.write(frame_rgb_uint8)``."""

    def __init__(self, path: str | Path, fps: float, size: tuple[int, int], *, audio: str | Path | None = None,
                 crf: int = 18, preset: str = "medium"):
        if not 0 <= crf <= 51:
            raise UsageError(f"--crf must be in 0..51, got {crf}")
        self.path = Path(path)
        self.size = (int(size[0]), int(size[1]))
        self.fps = Fraction(fps).limit_denominator(10000)
        self.audio = Path(audio) if audio is not None else None
        self.crf, self.preset = crf, preset
        self.frames = 0
        self._atomic = None
        self._proc: subprocess.Popen | None = None
        self._err = None

    def __enter__(self) -> "VideoWriter":
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        w, h = self.size
        video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", framerate=str(self.fps))
        if w % 2 or h % 2:
            video = video.filter("pad", w + w % 2, h + h % 2)
        streams = [video]
        opts = dict(vcodec="libx264", pix_fmt="yuv420p", crf=self.crf, preset=self.preset, movflags="+faststart",
                    r=str(self.fps), format="mp4")
        if self.audio is not None:
            streams.append(ffmpeg.input(str(self.audio)).audio)
            opts.update(acodec="aac", audio_bitrate="160k", shortest=None)
        out = ffmpeg.output(*streams, str(tmp), **opts)
        self._err = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(compile_args(out), stdin=subprocess.PIPE, stderr=self._err)
        return self

    def write(self, frame: np.ndarray) -> None:
        w, h = self.size
        if frame.shape != (h, w, 3) or frame.dtype != np.uint8:
            raise ValueError(f"expected a {h}x{w}x3 uint8 frame, got {frame.shape} {frame.dtype}")
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(np.ascontiguousarray(frame).tobytes())
        except BrokenPipeError:
            self._fail()
        self.frames += 1

    def _fail(self) -> None:
        assert self._proc is not None and self._err is not None
        self._proc.wait()
        self._err.seek(0)
        raise ffmpeg_error(self._err.read().decode("utf-8", "replace"), f"writing {self.path.name}", self.path)

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._atomic is not None
        try:
            self._finish(ok=exc_type is None)
        except BaseException as err:
            self._atomic.__exit__(type(err), err, err.__traceback__)
            raise
        self._atomic.__exit__(exc_type, exc, tb)

    def _finish(self, ok: bool) -> None:
        assert self._proc is not None and self._err is not None
        try:
            if self._proc.stdin:
                try:
                    self._proc.stdin.close()
                except BrokenPipeError:
                    pass
            if not ok:
                self._proc.kill()
                self._proc.wait()
                return
            rc = self._proc.wait()
            if self.frames == 0:
                raise InputError(f"no frames were written to {self.path.name}")
            if rc != 0:
                self._fail()
        finally:
            self._err.close()


# what ffmpeg prints (strerror) when the output cannot be written: the storage errors of exit code 4
_STORAGE = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
            "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES}


def ffmpeg_error(stderr: str, doing: str, path: Path) -> TalkError:
    """ffmpeg's failure as the error the user can act on: a full or read-only disk is a
    StorageError like any other write, anything else an InputError with ffmpeg's last line."""
    for text, code in _STORAGE.items():
        if text in stderr:
            return storage_error(OSError(code, text), str(path))
    return InputError(f"ffmpeg failed while {doing}: {_last_error_line(stderr)}")


def mux(video: str | Path, audio: str | Path, out: str | Path) -> None:
    """Copy the video stream and add ``audio`` (re-encoded to AAC) starting at frame 0."""
    v = ffmpeg.input(str(video)).video
    a = ffmpeg.input(str(audio)).audio
    with atomic_path(Path(out)) as tmp:
        args = compile_args(ffmpeg.output(v, a, str(tmp), vcodec="copy", acodec="aac", audio_bitrate="160k",
                                          shortest=None, movflags="+faststart", format="mp4"))
        proc = subprocess.run(args, capture_output=True, text=True, errors="replace")
        if proc.returncode != 0:
            raise ffmpeg_error(proc.stderr, f"muxing {Path(out).name}", Path(out))

"""Which ffmpeg binary we drive, and running it with errors the user can read.

A system ffmpeg on PATH wins (users may have one with more codecs); otherwise the static binary
that imageio-ffmpeg ships (libx264 and aac included) is used. ``TALKCLI_FFMPEG`` overrides both.
Commands are built with ffmpeg-python and run with our own subprocess handling so that stdout can
be streamed frame by frame while stderr goes to a temporary file (no pipe deadlock).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from typing import IO, Iterator

import ffmpeg

from ..errors import InputError, TalkError


@functools.lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    env = os.environ.get("TALKCLI_FFMPEG")
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise TalkError(f"TALKCLI_FFMPEG={env} is not an executable file")
        return env
    system = shutil.which("ffmpeg")
    if system:
        return system
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as exc:  # the wheel always ships a binary; a broken install is the only way here
        raise TalkError("no ffmpeg found: install imageio-ffmpeg (pip) or put ffmpeg on PATH") from exc


@functools.lru_cache(maxsize=1)
def ffmpeg_version() -> str:
    try:
        out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-version"], capture_output=True, text=True, timeout=30)
        first = out.stdout.splitlines()[0] if out.stdout else "unknown"
        return first.replace("ffmpeg version ", "").split(" Copyright")[0]
    except (OSError, subprocess.SubprocessError):
        return "unavailable"


def compile_args(stream: "ffmpeg.nodes.OutputStream") -> list[str]:
    """The argument list of an ffmpeg-python graph, quiet and non-interactive."""
    args = ffmpeg.compile(stream, cmd=ffmpeg_exe(), overwrite_output=True)
    return [args[0], "-nostdin", "-hide_banner", "-loglevel", "error", *args[1:]]


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def run(stream: "ffmpeg.nodes.OutputStream", what: str) -> None:
    """Run an ffmpeg graph to completion; raise InputError with ffmpeg's last error line."""
    args = compile_args(stream)
    proc = subprocess.run(args, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        raise InputError(f"ffmpeg failed while {what}: {_last_error_line(proc.stderr)}")


class Reader:
    """Stream fixed-size records (raw frames or audio chunks) from ffmpeg's stdout."""

    def __init__(self, stream: "ffmpeg.nodes.OutputStream", what: str):
        self.what = what
        self._err: IO[bytes] = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(compile_args(stream), stdout=subprocess.PIPE, stderr=self._err)

    def records(self, size: int) -> Iterator[bytes]:
        assert self.proc.stdout is not None
        while True:
            buf = self.proc.stdout.read(size)
            if not buf:
                return
            if len(buf) < size:  # a short tail only happens on audio; frames are whole
                yield buf
                return
            yield buf

    def read_all(self) -> bytes:
        assert self.proc.stdout is not None
        return self.proc.stdout.read()

    def close(self, check: bool = True) -> None:
        if self.proc.poll() is None:
            if self.proc.stdout:
                self.proc.stdout.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            check = False  # we stopped it early on purpose
        rc = self.proc.returncode
        self._err.seek(0)
        err = self._err.read().decode("utf-8", "replace")
        self._err.close()
        if check and rc != 0:
            raise InputError(f"ffmpeg failed while {self.what}: {_last_error_line(err)}")

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(check=exc_type is None)

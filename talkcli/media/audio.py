"""Audio in and out: any file ffmpeg reads -> mono float32 at a chosen rate; 16-bit wav out.

ffmpeg resamples (soxr-quality swresample) and downmixes; its ``aresample=async=1:first_pts=0``
pads with silence when a stream starts after time zero of the file timeline and trims what lies
before it (encoder priming), so sample n is at n / sr on the same timeline as the video frames.
"""

from __future__ import annotations

import wave
from pathlib import Path

import av
import ffmpeg
import numpy as np

from ..errors import InputError
from ..workspace import atomic_path
from .ffmpeg import Reader
from .probe import MediaInfo


def load_audio(path: str | Path, sr: int = 16000, *, stream_index: int | None = None) -> np.ndarray:
    """Decode the first (or given) audio stream of any media file to mono float32 at ``sr``.

    Channels are averaged here rather than by ffmpeg's ``-ac 1``, whose stereo downmix is
    (L+R)/sqrt(2): louder than the source and able to clip.
    """
    _check_wav_complete(Path(path))
    channels = _channel_count(path, stream_index)
    inp = ffmpeg.input(str(path))
    audio = inp[f"{stream_index}"] if stream_index is not None else inp.audio
    audio = audio.filter("aresample", sr, **{"async": 1, "first_pts": 0, "filter_size": 64})
    out = audio.output("pipe:", format="f32le", acodec="pcm_f32le", ac=channels, ar=sr)
    with Reader(out, f"decoding the audio of {Path(path).name}") as reader:
        data = reader.read_all()
    samples = np.frombuffer(data, np.float32)
    samples = samples[: samples.size - samples.size % channels].reshape(-1, channels)
    return samples.mean(axis=1, dtype=np.float32)


def _channel_count(path: str | Path, stream_index: int | None) -> int:
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            streams = [s for s in container.streams if s.type == "audio"
                       and (stream_index is None or s.index == stream_index)]
            if not streams:
                raise InputError(f"{Path(path).name} has no audio stream")
            return max(1, streams[0].codec_context.channels)
    except av.error.FFmpegError as exc:
        raise InputError(f"cannot read {Path(path).name}: not a media file, or truncated/corrupt") from exc


# data sizes that writers to a pipe leave in the header, not knowing the length (ffmpeg 0xFFFFFFFF,
# sox 0x7FFFF000): such a file is read to its end
_UNKNOWN_SIZE = 0x7FFF0000


def _check_wav_complete(path: Path) -> None:
    """Refuse a WAV whose data chunk declares more bytes than the file holds (an interrupted
    copy or download): ffmpeg would quietly decode what is there."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return  # not a WAV (RF64 and others keep their sizes elsewhere)
            byte_rate = 0
            while True:
                chunk = fh.read(8)
                if len(chunk) < 8:
                    return  # no data chunk: ffmpeg says what is wrong
                cid, n = chunk[:4], int.from_bytes(chunk[4:], "little")
                if cid == b"data":
                    break
                if cid == b"fmt ":
                    fmt = fh.read(n + (n & 1))
                    byte_rate = int.from_bytes(fmt[8:12], "little") if len(fmt) >= 12 else 0
                else:
                    fh.seek(n + (n & 1), 1)
            present = size - fh.tell()
    except OSError:
        return  # unreadable: PyAV reports it with the file name
    if n == 0 or n >= _UNKNOWN_SIZE or present >= n - max(byte_rate // 100, 1):  # within 10 ms is complete
        return
    if byte_rate:
        raise InputError(f"{path.name} is truncated: its header declares {n / byte_rate:.2f} s of audio but the file "
                         f"holds {max(present, 0) / byte_rate:.2f} s")
    raise InputError(f"{path.name} is truncated: its header declares {n} bytes of audio but the file holds {present}")


def aligned_audio(info: MediaInfo, sr: int, n_samples: int) -> np.ndarray:
    """The file's audio from time zero, cut or zero-padded to exactly ``n_samples``."""
    if info.audio is None:
        raise InputError(f"{info.path} has no audio stream")
    samples = load_audio(info.path, sr, stream_index=info.audio.index)
    if samples.size >= n_samples:
        return samples[:n_samples]
    return np.pad(samples, (0, n_samples - samples.size))


def write_wav(path: Path, samples: np.ndarray, sr: int) -> None:
    """16-bit PCM mono wav, written atomically."""
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
    with atomic_path(Path(path)) as tmp:
        with wave.open(str(tmp), "wb") as wf:
            wf.setnchannels(1)
            wf.setsampwidth(2)
            wf.setframerate(sr)
            wf.writeframes(pcm.tobytes())


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Read a wav written by :func:`write_wav` (mono 16-bit) as float32."""
    with wave.open(str(path), "rb") as wf:
        sr = wf.getframerate()
        data = np.frombuffer(wf.readframes(wf.getnframes()), "<i2")
    return data.astype(np.float32) / 32767.0, sr

"""Audio features aligned to video frames.

Log-mel: ``per_frame`` analysis windows per video frame, centred at (i + (j + 0.5) / per_frame) / fps
seconds for frame i, window j. The window positions are rounded to the nearest sample rather
than stepped by an integer hop, so any frame rate (29.97 included) gets exactly ``per_frame``
feature frames per video frame with no drift; at 25 fps and 16 kHz this is the usual 10 ms hop.
The mel filterbank is librosa's (Slaney), the spectrum a Hann-windowed power FFT.
"""

from __future__ import annotations

import numpy as np

from ..config import PreprocessConfig

CHUNK = 4096  # analysis windows per FFT batch: bounded memory for long audio


def logmel(samples: np.ndarray, sr: int, fps: float, n_frames: int, cfg: PreprocessConfig,
           progress=None) -> np.ndarray:
    """(n_frames, per_frame, mel_bins) float32 log10 mel power."""
    import librosa

    k = cfg.mel_per_frame
    win = int(round(cfg.mel_window_s * sr))
    n_fft = 1 << (win - 1).bit_length()
    window = np.zeros(n_fft, np.float32)
    off = (n_fft - win) // 2
    window[off:off + win] = np.hanning(win + 2)[1:-1]  # Hann without its zero end points
    mel_fb = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=cfg.mel_bins, fmin=cfg.mel_fmin,
                                 fmax=min(cfg.mel_fmax, sr / 2)).astype(np.float32)
    centres = (np.arange(n_frames * k) + 0.5) / (fps * k) * sr
    starts = np.round(centres - n_fft / 2).astype(np.int64) + n_fft  # index into the padded signal
    padded = np.pad(samples.astype(np.float32), (n_fft, 2 * n_fft))
    out = np.empty((n_frames * k, cfg.mel_bins), np.float32)
    ramp = np.arange(n_fft)
    for a in range(0, len(starts), CHUNK):
        idx = starts[a:a + CHUNK, None] + ramp
        spec = np.abs(np.fft.rfft(padded[idx] * window, axis=1)) ** 2
        out[a:a + CHUNK] = np.log10(np.maximum(spec @ mel_fb.T, 1e-10))
        if progress is not None:
            progress.advance(len(idx) / k)
    return out.reshape(n_frames, k, cfg.mel_bins)


def compute(samples: np.ndarray, sr: int, fps: float, n_frames: int, cfg: PreprocessConfig,
            progress=None) -> dict:
    """Features and their description, ready for ``np.savez``."""
    assert cfg.audio_features == "logmel", "validated by PreprocessConfig.validate"
    feats = logmel(samples, sr, fps, n_frames, cfg, progress)
    return {
        "features": feats,
        "kind": np.array("logmel"),
        "fps": np.float64(fps),
        "sample_rate": np.int64(sr),
        "per_frame": np.int64(cfg.mel_per_frame),
        "window_s": np.float64(cfg.mel_window_s),
        "fmin": np.float64(cfg.mel_fmin),
        "fmax": np.float64(min(cfg.mel_fmax, sr / 2)),
    }

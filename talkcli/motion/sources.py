"""Where a motion track comes from: speech audio, an expression file, or another workspace.

Every source becomes per-frame landmark offsets from the subject's neutral shape in face-scale
units (T, 68, 3), at the subject's frame rate; ``drive`` adds pose and blinks and turns them into
landmarks of the subject.

Expression files (``--expressions FILE``), one row per frame at the subject's frame rate:
- CSV with a header: ``x0,y0,z0,...,x67,y67,z67`` (68 landmarks in the head frame, metres) or
  the same for 478 mediapipe points (the 68 iBUG points are taken from them), or ``e0,e1,...``
  (expression coefficients of the subject's built-in face model, as in its facefit.npz);
- NPZ with ``landmarks`` (T, 68 or 478, 3) or ``expression`` (T, K).
Landmark files are re-targeted: their offsets from their own mean shape, in their own face
widths, are applied to this subject.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifacts import NPZ_ERRORS, workspace_npz
from ..errors import InputError, MissingModel, UsageError
from ..workspace import Workspace
from .audio2motion import face_scale

def _ibug68() -> np.ndarray:
    from ..preprocess.facemodel.mesh import IBUG68 as idx

    return np.asarray(idx, dtype=np.int64)


def load_speech(path: Path, sr: int, fps: float) -> tuple[np.ndarray, int]:
    """The ``--audio`` file as mono samples at ``sr`` and its length in frames at ``fps`` (at
    least one); errors name the file."""
    from ..media.audio import load_audio

    path = Path(path)
    if path.is_dir():
        raise InputError(f"--audio {path}: a directory, not an audio file")
    if not path.is_file():
        raise InputError(f"--audio {path}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"--audio {path.name} is empty (0 bytes)")
    samples = load_audio(path, sr)
    n = int(round(samples.size / sr * fps))
    if n < 1:
        raise InputError(f"--audio {path.name} is empty (less than one frame of audio)")
    return samples, n


def audio_features(path: Path, fps: float, visemes: bool = False) -> tuple[dict[str, np.ndarray], float]:
    """Features of any audio file ffmpeg reads at the subject's frame rate, T = round(duration * fps):
    {"mel": (T, 4, 80) log-mel} and, with ``visemes``, the phone recogniser's {"visemes": (T, 4, V)};
    and the duration in seconds."""
    from ..config import PreprocessConfig
    from ..preprocess.audio_features import logmel

    cfg = PreprocessConfig()
    samples, n = load_speech(path, cfg.sample_rate, fps)
    seconds = samples.size / cfg.sample_rate
    feats = {"mel": logmel(samples, cfg.sample_rate, fps, n, cfg)}
    if visemes:
        from . import phonetic

        if not phonetic.available():
            raise MissingModel("this motion model reads visemes from speech: install the phone recogniser "
                               "with `pip install pocketsphinx`")
        feats["visemes"] = phonetic.viseme_features(samples, cfg.sample_rate, fps, n, cfg.mel_per_frame)
    return feats, seconds


def offsets_from_landmarks(lmk: np.ndarray) -> np.ndarray:
    """Landmarks (T, 68, 3) of anyone -> offsets from their mean in their face widths."""
    return (lmk - lmk.mean(0)) / face_scale(lmk)


def read_expressions(path: Path, ws: Workspace) -> np.ndarray:
    """Offsets (T, 68, 3) in face-scale units from an expression file (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--expressions {path}: no such file")
    if path.suffix.lower() == ".npz":
        try:  # the arrays are read here too: a damaged member fails on reading, not on opening
            data = np.load(path)
            arrays = {k: np.asarray(data[k], np.float64) for k in ("landmarks", "expression") if k in data}
        except NPZ_ERRORS as exc:
            raise InputError(f"--expressions {path.name}: not a readable NPZ file ({type(exc).__name__})") from None
        if "landmarks" in arrays:
            return _landmark_offsets(arrays["landmarks"], path)
        if "expression" in arrays:
            return _expression_offsets(arrays["expression"], ws, path)
        raise InputError(f"--expressions {path.name}: needs an array 'landmarks' (T, 68|478, 3) or 'expression' (T, K)")
    if path.suffix.lower() != ".csv":
        raise UsageError(f"--expressions {path.name}: use a .csv or .npz file (docs/cli.md)")
    import csv

    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if len(rows) < 2:
        raise InputError(f"--expressions {path.name}: no rows after the header")
    header = [h.strip() for h in rows[0]]
    try:
        values = np.array([[float(v) for v in r] for r in rows[1:] if r], np.float64)
    except ValueError:
        raise InputError(f"--expressions {path.name}: every value after the header must be a number") from None
    if values.shape[1] != len(header):
        raise InputError(f"--expressions {path.name}: rows have {values.shape[1]} values, the header {len(header)}")
    if header[0] == "x0":
        n = len(header) // 3
        return _landmark_offsets(values.reshape(len(values), n, 3), path)
    if header[0] == "e0":
        return _expression_offsets(values, ws, path)
    raise InputError(f"--expressions {path.name}: the header must start with x0 (landmarks) or e0 (expression "
                     "coefficients)")


def _landmark_offsets(lmk: np.ndarray, path: Path) -> np.ndarray:
    if lmk.ndim != 3 or lmk.shape[2] != 3 or lmk.shape[1] not in (68, 478):
        raise InputError(f"--expressions {path.name}: landmarks must be (T, 68 or 478, 3), got {lmk.shape}")
    if lmk.shape[1] == 478:
        lmk = lmk[:, _ibug68()]
    if not np.isfinite(lmk).all():
        raise InputError(f"--expressions {path.name}: landmarks contain NaN or infinite values")
    return offsets_from_landmarks(lmk)


def _expression_offsets(expr: np.ndarray, ws: Workspace, path: Path) -> np.ndarray:
    fit = workspace_npz(ws, "facefit.npz")
    if "basis" not in fit or str(fit["model"]) != "builtin":
        raise InputError("--expressions with coefficients needs a workspace fitted with the built-in face model")
    basis = fit["basis"][:, _ibug68()]  # (K, 68, 3)
    if expr.ndim != 2 or expr.shape[1] > basis.shape[0]:
        raise InputError(f"--expressions {path.name}: {expr.shape[1] if expr.ndim == 2 else '?'} coefficients, "
                         f"the subject's face model has {basis.shape[0]}")
    lmk = fit["neutral"][_ibug68()][None] + np.einsum("tk,kpd->tpd", expr, basis[: expr.shape[1]])
    ref = fit["landmarks3d"][:, _ibug68()]
    return (lmk - np.nanmean(ref, axis=0)) / face_scale(ref[np.isfinite(ref).all(axis=(1, 2))])


def from_workspace(other: Workspace) -> tuple[np.ndarray, np.ndarray, np.ndarray, Path | None]:
    """Cross-reenactment: another subject's tracked offsets (T, 68, 3), its poses (rotation,
    translation) and its audio (when it has one)."""
    from ..avatar.data import check_preprocessed
    from ..avatar.data import subject_landmarks

    check_preprocessed(other)
    lmk, _ = subject_landmarks(other)
    fit = workspace_npz(other, "facefit.npz")
    wav = other.path("audio/audio.wav")
    return offsets_from_landmarks(lmk), fit["rotation"], fit["translation"], wav if wav.is_file() else None

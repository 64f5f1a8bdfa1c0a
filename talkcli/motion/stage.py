"""The motion stage of ``talk train`` (person-specific) and ``talk train-motion`` (general).

    audio/features.npz (log-mel)
    audio/audio.wav --phone recogniser--> visemes     --fit--> models/motion/motion.pt
    facefit.npz (68 landmarks, head frame)                     models/motion/eval.json

Held-out frames are the avatar's (the last ``holdout_fraction`` of the clip). The evaluation
compares the predicted mouth landmarks with the tracked ones there, beside two baselines: the
mean expression, and nearest-neighbour retrieval on the audio features (the landmarks of the
training frame whose audio window is closest).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from .. import progress
from ..artifacts import from_saved, load_torch, to_saved, workspace_npz
from ..avatar.data import check_preprocessed, subject_landmarks
from ..errors import InputError
from ..workspace import Workspace, run_stage, write_json, write_torch
from . import phonetic
from .audio2motion import (MotionConfig, MotionData, MotionEnsemble, MotionModel, audio_windows, face_scale, fit,
                           model_from_dict, mouth_error, mouth_opening)

MOTION_FILE = "models/motion/motion.pt"
MOTION_EVAL = "models/motion/eval.json"
CODE_VERSION = 5
UPSTREAM = ("landmarks", "facefit", "audio_features")


def subject_data(ws: Workspace, holdout_fraction: float, name: str | None = None):
    """MotionData of a workspace plus what turning offsets back into its landmarks needs."""
    feats_path = ws.path("audio/features.npz")
    if not feats_path.is_file():
        raise InputError(f"workspace {ws.root} has no audio (its video has no sound track): the audio-to-motion "
                         "model needs the subject speaking")
    features = subject_features(ws)
    lmk, ok = subject_landmarks(ws)
    n = min(len(features["mel"]), len(lmk))
    features, lmk, ok = {k: v[:n] for k, v in features.items()}, lmk[:n], ok[:n]
    n_hold = int(round(n * holdout_fraction))
    train = np.flatnonzero(ok[: n - n_hold])
    hold = np.arange(n - n_hold, n)
    if len(train) < 20:
        raise InputError(f"only {len(train)} usable frames with audio in {ws.root}: too few to learn motion")
    scale = face_scale(lmk[ok])
    neutral = lmk[train].mean(0)
    offsets = (lmk - neutral) / scale
    return MotionData(name or ws.root.name, features, offsets, neutral / scale, train), lmk, neutral, scale, train, hold


def subject_features(ws: Workspace) -> dict[str, np.ndarray]:
    """The workspace's log-mel features and, when the phone recogniser is installed, its viseme
    features at the same window centres."""
    mel = workspace_npz(ws, "audio/features.npz")
    out = {"mel": mel["features"].astype(np.float32)}
    if phonetic.available():
        from ..media.audio import load_audio

        samples = load_audio(ws.path("audio/audio.wav"), 16000)
        out["visemes"] = phonetic.viseme_features(samples, 16000, float(mel["fps"]), len(out["mel"]),
                                                  int(mel["per_frame"]))
    return out


def audio_retrieval(features: dict[str, np.ndarray], train: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """The retrieval baseline: for each of ``frames``, the training frame whose log-mel window (16
    bands, +-4 frames) is closest."""
    win = audio_windows(features["mel"], 16, 4)
    dist = ((win[frames][:, None, :] - win[train][None, :, :]) ** 2).sum(-1)
    return train[dist.argmin(1)]


def evaluate(model: MotionModel | MotionEnsemble, data: MotionData, lmk: np.ndarray, neutral: np.ndarray, scale: float,
             train: np.ndarray, hold: np.ndarray) -> dict:
    """Mouth error (mm) and mouth-opening correlation on the held-out frames, with baselines."""
    if len(hold) == 0:
        return {}
    true = lmk[hold]
    pred = neutral + model.predict_offsets(data.features)[hold] * scale
    mean = np.broadcast_to(neutral, true.shape)
    retrieval = lmk[audio_retrieval(data.features, train, hold)]

    def corr(p):
        a, b = mouth_opening(p), mouth_opening(true)
        return float(np.corrcoef(a, b)[0, 1]) if a.std() > 1e-9 and b.std() > 1e-9 else 0.0

    def spread(p):  # how much the mouth opens and closes (mm)
        return round(float(mouth_opening(p).std() * 1000), 3)

    out = {}
    for name, p in (("audio2motion", pred), ("mean_expression", mean), ("audio_retrieval", retrieval)):
        out[name] = {"mouth_mm": round(mouth_error(p, true, 1.0), 3), "opening_corr": round(corr(p), 3),
                     "opening_std_mm": spread(p)}
    out["tracked"] = {"opening_std_mm": spread(true)}
    out["frames"] = [int(hold[0]), int(hold[-1])]
    out["selected"] = model.describe()
    return out


def run(ws: Workspace, holdout_fraction: float = 0.1, cfg: MotionConfig = MotionConfig(), *,
        force: bool = False) -> dict:
    """Train (or skip when up to date) the subject's audio-to-motion model."""
    check_preprocessed(ws)
    rec = ws.record("audio_features")
    if rec is None or not ws.path("audio/features.npz").is_file():
        raise InputError(f"workspace {ws.root} has no audio features (no sound track?): the motion model needs them")
    upstream = {name: ws.record(name)["output_key"] for name in UPSTREAM}
    config = {"holdout_fraction": holdout_fraction, **dataclasses.asdict(cfg), "visemes": phonetic.available()}

    def fn() -> dict:
        data, lmk, neutral, scale, train, hold = subject_data(ws, holdout_fraction)
        with progress.bar("train motion", len(cfg.windows(tuple(data.features))), unit="settings") as bar:
            model = fit([data], cfg, bar)
        result = evaluate(model, data, lmk, neutral, scale, train, hold)
        ws.path("models/motion").mkdir(parents=True, exist_ok=True)
        save(ws.path(MOTION_FILE), model, neutral=neutral, scale=scale)
        write_json(ws.path(MOTION_EVAL), result)
        return result

    res = run_stage(ws, "train_motion", code_version=CODE_VERSION, config=config, inputs=upstream,
                    outputs=[MOTION_FILE, MOTION_EVAL], fn=fn, force=force)
    return {"skipped": res.skipped, **res.record.get("summary", {})}


def save(path: Path, model: MotionModel | MotionEnsemble, **extra) -> None:
    """A motion model file: its arrays as tensors, so that ``load`` unpickles it with ``weights_only``."""
    write_torch(path, to_saved({**model.to_dict(), **extra}))


def load(path: Path) -> MotionModel | MotionEnsemble:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no motion model at {path}; run `talk train {path.parent.parent.parent}` first")
    own = path.parts[-3:] == Path(MOTION_FILE).parts  # a workspace's, not one from train-motion
    rerun = f"talk train {path.parent.parent.parent} --force" if own else f"talk train-motion WORKSPACE... -o {path}"
    payload = load_torch(path, rerun)
    if isinstance(payload, dict):
        try:
            return model_from_dict(from_saved(payload))
        except (KeyError, TypeError):  # fields missing: a torch file, but not of a motion model
            pass
    raise InputError(f"{path} is not a talkcli motion model; run `{rerun}` again")


def train_general(workspaces: list[Workspace], out: Path, holdout_fraction: float = 0.1,
                  cfg: MotionConfig = MotionConfig()) -> dict:
    """One model from several workspaces (``talk train-motion``), evaluated on each one's held-out frames."""
    sets = [subject_data(ws, holdout_fraction, name=str(ws.root)) for ws in workspaces]
    with progress.bar("train motion", len(cfg.windows(tuple(sets[0][0].features))), unit="settings") as bar:
        model = fit([s[0] for s in sets], cfg, bar)
    save(Path(out), model)
    return {"model": str(out), "subjects": model.subjects,
            "eval": {str(ws.root): evaluate(model, *s) for ws, s in zip(workspaces, sets)}}

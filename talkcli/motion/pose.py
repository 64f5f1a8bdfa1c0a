"""Head pose and blinks for a driven track.

Poses (``--pose``): ``still`` holds the mean training pose (rotation averaged by SVD);
``loop`` plays the training poses forward then backward (a ping-pong, so there is never a jump);
``source`` uses the driving source's own poses (another workspace) or the subject's clip, played
the same way when the track is longer.

Blinks: audio carries no blinks, so they are added: the subject's own blink shape (eye landmarks
36-47 of its most-closed training frame, relative to its median) with a 0.24 s raised-cosine
profile, every 2.5-5.5 s (seeded). A subject whose clip has no blink (closed less than half of
the median opening) gets none.
"""

from __future__ import annotations

import numpy as np

EYES = np.arange(36, 48)


def ping_pong(n_source: int, n: int) -> np.ndarray:
    """Indices 0, 1, ..., n_source-1, n_source-2, ..., 1, 0, 1, ... of length n."""
    if n_source <= 1:
        return np.zeros(n, np.int64)
    period = 2 * (n_source - 1)
    k = np.arange(n) % period
    return np.where(k < n_source, k, period - k).astype(np.int64)


def mean_pose(rotation: np.ndarray, translation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, _, vt = np.linalg.svd(rotation.mean(0))
    r = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vt
    return r.astype(np.float32), translation.mean(0).astype(np.float32)


def poses(mode: str, n: int, rotation: np.ndarray, translation: np.ndarray, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3, 3), (n, 3) poses; ``frames``: the usable frames of ``rotation``/``translation``."""
    if mode == "still":
        r, t = mean_pose(rotation[frames], translation[frames])
        return np.broadcast_to(r, (n, 3, 3)).copy(), np.broadcast_to(t, (n, 3)).copy()
    idx = frames[ping_pong(len(frames), n)]
    return rotation[idx].astype(np.float32), translation[idx].astype(np.float32)


def eye_opening(lmk: np.ndarray) -> np.ndarray:
    """Mean lid distance of both eyes per frame (iBUG 37-41, 38-40, 43-47, 44-46)."""
    pairs = ((37, 41), (38, 40), (43, 47), (44, 46))
    return np.mean([np.linalg.norm(lmk[:, a] - lmk[:, b], axis=-1) for a, b in pairs], axis=0)


def blink_shape(landmarks: np.ndarray, scale: float) -> np.ndarray | None:
    """(68, 3) offset in face-scale units that closes the eyes (zero elsewhere), from the
    subject's tracked landmarks (T, 68, 3); None when the clip shows no blink (the most-closed
    frame still at least half as open as usual)."""
    op = eye_opening(landmarks)
    med = float(np.median(op))
    closed = int(np.argmin(op))
    if med <= 0 or op[closed] > 0.5 * med:
        return None
    ref = np.median(landmarks, axis=0)
    shape = np.zeros_like(ref)
    shape[EYES] = (landmarks[closed, EYES] - ref[EYES]) / scale
    return shape


def add_blinks(offsets: np.ndarray, shape: np.ndarray | None, fps: float, seed: int = 0) -> np.ndarray:
    """Offsets with the eyes' own motion replaced by blinks every 2.5-5.5 s."""
    out = offsets.copy()
    if shape is None:
        return out
    n = len(out)
    out[:, EYES] = np.median(offsets[:, EYES], axis=0)  # audio-driven eyes are noise: hold them open
    rng = np.random.default_rng(seed)
    length = max(3, int(round(0.24 * fps)))
    profile = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / (length - 1))
    t = rng.uniform(1.0, 3.0) * fps
    while t + length < n:
        s = int(t)
        out[s:s + length, EYES] += profile[:, None, None] * shape[EYES][None]
        t += rng.uniform(2.5, 5.5) * fps
    return out

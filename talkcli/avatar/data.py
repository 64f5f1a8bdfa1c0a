"""A preprocessed workspace as an avatar training set.

Everything the avatar needs, at the training resolution: frames and head/torso labels as uint8
(memory grows with the clip exactly like its uint8 frames, nothing is kept as float), the
background plate, per-frame cameras in the head frame, the 68 pose-normalised 3D landmarks that
condition R2-Talker, and boxes for ray oversampling (head) and lips fine-tuning (mouth).

Coordinates: the head frame of ``facefit.npz`` (metres; x subject's left, y down, z away from the
camera). Camera i sees a head point X at R_i X + t_i, so its centre in the head frame is
-R_i^T t_i and the ray through pixel (u, v) has direction R_i^T ((u + .5 - cx)/f, (v + .5 - cy)/f, 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..artifacts import workspace_npz
from ..errors import InputError, UsageError
from ..preprocess.frameio import prefetch, read_frames
from ..workspace import Workspace, read_json

REQUIRED = ("frames", "landmarks", "matting", "facefit")
MOUTH = slice(48, 68)  # iBUG 68: outer and inner lips
HEAD, TORSO = 2, 1


def check_preprocessed(ws: Workspace) -> None:
    """One clear error naming the stage to run when the workspace is not ready for training."""
    if not ws.root.is_dir():
        raise InputError(f"{ws.root} does not exist; run `talk preprocess VIDEO -w {ws.root}` first")
    if not ws.is_workspace():
        raise InputError(f"{ws.root} is not a talkcli workspace; run `talk preprocess VIDEO -w {ws.root}` first")
    states = {s.name: s for s in ws.status()}
    for name in REQUIRED:
        st = states.get(name)
        if st is None or st.state != "done":
            why = "not run" if st is None else f"{st.state}: {st.reason}" if st.reason else st.state
            raise InputError(f"workspace {ws.root}: preprocess stage '{name}' is {why}; "
                             f"run `talk preprocess` on the video again (it redoes only what is missing)")


@dataclass
class SubjectData:
    size: int
    fps: float
    images: np.ndarray        # (N, S, S, 3) uint8
    labels: np.ndarray        # (N, S, S) uint8: 0 background, 1 torso, 2 head
    background: np.ndarray    # (S, S, 3) float32 in [0, 1]
    rotation: np.ndarray      # (N, 3, 3) float32 head -> camera
    translation: np.ndarray   # (N, 3) float32
    focal: float              # pixels at the training size
    cx: float
    cy: float
    landmarks: np.ndarray     # (N, 68, 3) float32 pose-normalised (head frame, metres)
    mesh: np.ndarray          # (N, 478, 3) float32 the fitted face mesh, pose-normalised likewise
    train_ok: np.ndarray      # (N,) bool: tracked and not in profile
    head_box: np.ndarray      # (N, 4) int: x0, y0, x1, y1 of the head label (whole frame when none)
    mouth_center: np.ndarray  # (N, 2) float: mouth centre in pixels

    @property
    def n_frames(self) -> int:
        return int(self.images.shape[0])

    def split(self, holdout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """(train, holdout) frame indices: the last ``holdout_fraction`` of the clip is held out."""
        n = self.n_frames
        n_hold = int(round(n * holdout_fraction))
        hold = np.arange(n - n_hold, n)
        train = np.flatnonzero(self.train_ok[: n - n_hold])
        if len(train) < 2:
            raise InputError(f"only {len(train)} usable training frames (tracked, not in profile); "
                             "a longer or more frontal video is needed")
        return train, hold

    def head_target(self, i: int) -> np.ndarray:
        """Frame i with everything but the head replaced by the background plate (uint8)."""
        bg = (self.background * 255 + 0.5).astype(np.uint8)
        return np.where((self.labels[i] == HEAD)[..., None], self.images[i], bg)


def load_subject(ws: Workspace, size: int) -> SubjectData:
    import cv2

    check_preprocessed(ws)
    meta = read_json(ws.path("frames/frames.json"))
    n, src = int(meta["n_frames"]), int(meta["width"])
    if size > src:
        raise UsageError(f"train.size {size} is larger than the workspace frames ({src}); "
                         f"preprocess with --size {size} or train smaller")
    frames_dir = ws.path("frames")
    paths = [frames_dir / (meta["pattern"] % i) for i in range(n)]
    label_paths = [ws.path("matting/masks") / f"{i:06d}.png" for i in range(n)]
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty((n, size, size), np.uint8)
    interp = cv2.INTER_AREA
    for i, rgb in enumerate(read_frames(paths)):
        images[i] = rgb if size == src else cv2.resize(rgb, (size, size), interpolation=interp)

    def read_label(p: Path) -> np.ndarray:
        lab = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        if lab is None:
            raise InputError(f"cannot read {p}; rerun `talk preprocess --force`")
        return lab if size == src else cv2.resize(lab, (size, size), interpolation=cv2.INTER_NEAREST)

    for i, lab in enumerate(prefetch(read_label(p) for p in label_paths)):
        labels[i] = lab
    bg = cv2.cvtColor(cv2.imread(str(ws.path("matting/bg.png")), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    bg = cv2.resize(bg, (size, size), interpolation=interp).astype(np.float32) / 255.0

    fit = workspace_npz(ws, "facefit.npz")
    lms = workspace_npz(ws, "landmarks.npz")
    scale = size / src
    idx68 = lms["ibug68_index"].astype(np.int64)
    landmarks, train_ok = tracked_landmarks(fit, idx68)
    mesh, _ = tracked_landmarks(fit, np.arange(fit["landmarks3d"].shape[1]))
    proj = fit["projected"][:, idx68] * scale
    mouth = np.nan_to_num(np.nanmean(proj[:, MOUTH], axis=1), nan=size / 2)
    head_box = np.empty((n, 4), np.int64)
    for i in range(n):
        ys, xs = np.nonzero(labels[i] == HEAD)
        head_box[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if len(xs) else (0, 0, size, size)
    return SubjectData(
        size=size, fps=float(meta["fps"]), images=images, labels=labels, background=bg,
        rotation=fit["rotation"].astype(np.float32), translation=fit["translation"].astype(np.float32),
        focal=float(fit["focal"]) * scale, cx=float(fit["cx"]) * scale, cy=float(fit["cy"]) * scale,
        landmarks=landmarks, mesh=mesh, train_ok=train_ok, head_box=head_box, mouth_center=mouth.astype(np.float32))


def tracked_landmarks(fit, idx68: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, P, 3) pose-normalised landmarks ``idx68`` (or any index set) of a face fit (head frame,
    metres; untracked frames filled from the nearest tracked one) and the (T,) usable-for-training flags."""
    lmk = fit["landmarks3d"][:, idx68].astype(np.float32)
    ok = fit["train"].astype(bool) & np.isfinite(lmk).all(axis=(1, 2))
    return _fill_gaps(lmk, ok), ok


def subject_landmarks(ws: Workspace) -> tuple[np.ndarray, np.ndarray]:
    """``tracked_landmarks`` of a workspace's facefit.npz."""
    idx68 = workspace_npz(ws, "landmarks.npz")["ibug68_index"].astype(np.int64)
    return tracked_landmarks(workspace_npz(ws, "facefit.npz"), idx68)


def _fill_gaps(lmk: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Untracked frames take the landmarks of the nearest tracked frame (windows stay defined)."""
    if ok.all() or not ok.any():
        return np.nan_to_num(lmk)
    good = np.flatnonzero(ok)
    nearest = good[np.abs(np.arange(len(ok))[:, None] - good[None, :]).argmin(axis=1)]
    return lmk[nearest]


# --------------------------------------------------------------------------- geometry


def head_aabb(landmarks: np.ndarray) -> tuple[float, ...]:
    """A box around the whole head (hair, ears, neck) from the face landmarks' extent (metres).

    The face mesh spans forehead to chin and cheek to cheek; the head reaches about 0.35 face
    widths beyond the cheeks, a face height above the eyebrows (hair) and half a face height
    below the chin (neck), and about 1.3 face widths back from the tip of the nose.
    """
    pts = landmarks.reshape(-1, 3)
    lo, hi = np.percentile(pts, 1, axis=0), np.percentile(pts, 99, axis=0)
    w, h = hi[0] - lo[0], hi[1] - lo[1]
    cx = 0.5 * (lo[0] + hi[0])
    return (float(cx - 0.85 * w), float(lo[1] - 0.9 * h), float(lo[2] - 0.25 * w),
            float(cx + 0.85 * w), float(hi[1] + 0.6 * h), float(lo[2] + 1.4 * w))


def landmark_box(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) that map the landmarks into [0, 1]^3 with 15% margin for unseen expressions."""
    pts = landmarks.reshape(-1, 3)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    pad = 0.15 * (hi - lo).max()
    return (lo - pad).astype(np.float32), (hi + pad).astype(np.float32)


def pixel_rays(rotation: torch.Tensor, translation: torch.Tensor, focal: float, cx: float, cy: float,
               u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays (origins, unit directions) in the head frame through pixels (u, v) (R,), with one
    camera per ray: rotation (R, 3, 3), translation (R, 3)."""
    d_cam = torch.stack([(u + 0.5 - cx) / focal, (v + 0.5 - cy) / focal, torch.ones_like(u)], dim=-1)
    d = torch.einsum("rji,rj->ri", rotation, d_cam)
    d = d / d.norm(dim=-1, keepdim=True)
    o = -torch.einsum("rji,rj->ri", rotation, translation)
    return o.contiguous(), d.contiguous()


def windows(n_frames: int, frames: np.ndarray, window: int) -> np.ndarray:
    """(B, window) frame indices centred on ``frames``, clamped at the clip's ends."""
    half = window // 2
    return np.clip(frames[:, None] + np.arange(-half, half + 1)[None, :], 0, n_frames - 1)

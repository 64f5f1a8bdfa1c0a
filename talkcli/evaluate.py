"""``talk eval``: the trained avatar on held-out frames, beside a nearest-neighbour baseline.

The last frames of the clip (``train.holdout_fraction``, 20 of the 8 s fixture's 200) are never
trained on. Each is rendered from its own tracked landmarks and head pose (head + torso over the
background plate) and compared with the real frame:

- PSNR and SSIM on the whole frame at the training size;
- LMD: mediapipe face-mesh landmarks of the render and of the real frame (both at the training
  size, upscaled to 512 so that the detector sees the same kind of image), the mean distance of
  the iBUG-68 mouth points (48-67) and of all 68, in pixels at 512;
- render speed: frames per second at the training size, and at 512 (one frame);
- LPIPS: only with LPIPS weights, which are not bundled: reported as not measured otherwise.

The retrieval baseline answers each held-out frame with the training frame whose 68 landmarks are
closest (what a lookup table of the training video would show), scored the same way.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from . import progress
from .avatar.data import load_subject, windows
from .avatar.metrics import psnr, ssim
from .avatar.render import render_frame
from .workspace import Workspace, atomic_path, write_json

EVAL_DIR = "eval/r2talker"
MOUTH = slice(48, 68)


class _Landmarks:
    """mediapipe iBUG-68 points of images, in pixels at 512."""

    def __init__(self):
        from .preprocess.facemodel.mesh import IBUG68
        from .preprocess.landmarks import FaceMesh

        self.mesh = FaceMesh()
        self.idx = IBUG68

    def __call__(self, rgb01: np.ndarray) -> np.ndarray | None:
        import cv2

        img = (np.clip(rgb01, 0, 1) * 255 + 0.5).astype(np.uint8)
        img = cv2.resize(img, (512, 512), interpolation=cv2.INTER_CUBIC)
        pts, _ = self.mesh(img)
        return None if pts is None else pts[self.idx, :2]

    def close(self) -> None:
        self.mesh.close()


def _lmd(a: np.ndarray | None, b: np.ndarray | None) -> tuple[float, float]:
    if a is None or b is None:
        return float("nan"), float("nan")
    d = np.linalg.norm(a - b, axis=-1)
    return float(d[MOUTH].mean()), float(d.mean())


def run(ws: Workspace, sample_images: int = 3) -> dict:
    import cv2

    from .preprocess.detect import quiet_native_stderr
    from .preprocess.frameio import write_image
    from .train import MODEL_FILE, load_model

    model, preset, payload = load_model(ws.path(MODEL_FILE))
    data = load_subject(ws, preset.train.size)
    hold = np.asarray(payload["holdout_frames"], dtype=np.int64)
    train = np.asarray(payload["train_frames"], dtype=np.int64)
    if len(hold) == 0:
        from .errors import UsageError

        raise UsageError("this avatar was trained on every frame (train.holdout_fraction = 0): "
                         "nothing is held out to evaluate on")
    window = preset.model.window
    from .avatar.lpips import at_least_64, load_lpips

    lp = load_lpips()

    def lpips_of(a: np.ndarray, b: np.ndarray) -> float:
        ta, tb = (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).permute(2, 0, 1)[None] for x in (a, b))
        with torch.no_grad():
            return float(lp(*at_least_64(ta, tb))[0])

    rows = {"avatar": [], "retrieval": []}
    renders, baselines = [], []
    lmk_train = data.landmarks[train].reshape(len(train), -1)
    render_seconds = 0.0
    with quiet_native_stderr():
        det_real, det_avatar, det_base = _Landmarks(), _Landmarks(), _Landmarks()
    try:
        with progress.bar("eval r2talker", len(hold), unit="frames") as bar, quiet_native_stderr():
            for f in hold:
                win = windows(data.n_frames, np.array([f]), window)[0]
                t0 = time.perf_counter()
                img, _ = render_frame(model, data.rotation[f], data.translation[f], data.landmarks[win],
                                      data.background, data.focal, data.cx, data.cy, torso=True)
                render_seconds += time.perf_counter() - t0
                gt = data.images[f].astype(np.float32) / 255.0
                nn = int(train[np.argmin(np.linalg.norm(lmk_train - data.landmarks[f].reshape(1, -1), axis=1))])
                base = data.images[nn].astype(np.float32) / 255.0
                ref_pts = det_real(gt)
                for name, pred, det in (("avatar", img, det_avatar), ("retrieval", base, det_base)):
                    mouth, full = _lmd(det(pred), ref_pts)
                    row = {"frame": int(f), "psnr": psnr(pred, gt), "ssim": ssim(pred, gt), "lmd_mouth": mouth,
                           "lmd_face": full}
                    if lp is not None:
                        row["lpips"] = lpips_of(pred, gt)
                    rows[name].append(row)
                renders.append(img)
                baselines.append(base)
                bar.advance()
    finally:
        for d in (det_real, det_avatar, det_base):
            d.close()
    # render speed at 512 (one frame after a warm-up at that size)
    k = 512 / data.size
    bg512 = cv2.resize(data.background, (512, 512), interpolation=cv2.INTER_LINEAR)
    f = int(hold[0])
    win = windows(data.n_frames, np.array([f]), window)[0]
    args = (model, data.rotation[f], data.translation[f], data.landmarks[win], bg512, data.focal * k,
            data.cx * k, data.cy * k)
    render_frame(*args)
    t0 = time.perf_counter()
    render_frame(*args)
    fps512 = 1.0 / (time.perf_counter() - t0)

    def mean(name: str, key: str) -> float:
        vals = np.array([r[key] for r in rows[name]], dtype=np.float64)
        return round(float(np.nanmean(vals)), 4) if np.isfinite(vals).any() else float("nan")

    keys = ("psnr", "ssim", "lmd_mouth", "lmd_face") + (("lpips",) if lp is not None else ())
    table = {name: {key: mean(name, key) for key in keys} for name in rows}
    table["avatar"]["fps"] = round(len(hold) / render_seconds, 2)
    table["avatar"]["fps_512"] = round(fps512, 2)
    out = ws.path(EVAL_DIR)
    out.mkdir(parents=True, exist_ok=True)
    # sample sheet: real | avatar | retrieval, a few held-out frames
    pick = np.linspace(0, len(hold) - 1, min(sample_images, len(hold))).round().astype(int)
    sheet = np.concatenate([np.concatenate([data.images[hold[i]].astype(np.float32) / 255.0, renders[i],
                                            baselines[i]], axis=1) for i in pick], axis=0)
    sheet = (sheet * 255 + 0.5).astype(np.uint8)
    if sheet.shape[1] < 768:
        s = 768 / sheet.shape[1]
        sheet = cv2.resize(sheet, None, fx=s, fy=s, interpolation=cv2.INTER_NEAREST)
    with atomic_path(out / "samples.png") as tmp:
        write_image(tmp, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    result = {"workspace": str(ws.root), "model": "r2talker", "preset": preset.name, "size": data.size,
              "holdout_frames": [int(hold[0]), int(hold[-1])], "train_frames": int(len(train)),
              "metrics": table,
              "lpips": "measured (AlexNet LPIPS)" if lp is not None else "not measured (no LPIPS weights configured)",
              "per_frame": rows, "samples": str(out / "samples.png")}
    write_json(out / "results.json", result)
    return result

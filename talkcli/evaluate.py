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

Every trained avatar of the workspace (R2-Talker, the mesh-anchored avatar) is scored on the same
frames in one table, with GFLOPs per frame counted from its networks (``avatar.flops``).
The retrieval baseline answers each held-out frame with the training frame whose 68 landmarks are
closest (what a lookup table of the training video would show), scored the same way.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from . import progress
from .avatar.data import load_subject
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


def _trained(ws: Workspace, models: list[str] | None) -> list[str]:
    from .errors import InputError
    from .train import trained_avatars

    kinds = list(models) if models else trained_avatars(ws)
    if not kinds:
        raise InputError(f"no trained avatar in {ws.root}; run `talk train {ws.root}` first")
    return kinds


def run(ws: Workspace, models: list[str] | None = None, sample_images: int = 3) -> dict:
    """Every trained avatar of ``ws`` (or ``models``) and the retrieval baseline on the same
    held-out frames; results.json and samples.png in eval/<model>/ and eval/ (all together)."""
    import cv2

    from .avatar.flops import frame_flops
    from .errors import UsageError
    from .preprocess.detect import quiet_native_stderr
    from .preprocess.frameio import write_image
    from .train import load_model, model_file

    avatars = {}
    for kind in _trained(ws, models):
        avatars[kind] = load_model(ws.path(model_file(kind)))
    first = next(iter(avatars.values()))
    size = first[1].train.size
    hold = np.asarray(first[2]["holdout_frames"], dtype=np.int64)
    train = np.asarray(first[2]["train_frames"], dtype=np.int64)
    for kind, (_, preset, payload) in avatars.items():
        if preset.train.size != size or list(payload["holdout_frames"]) != hold.tolist():
            raise UsageError(f"the avatars were trained at different sizes or hold out different frames "
                             f"({kind}: {preset.train.size}²); evaluate them one at a time with --model")
    if len(hold) == 0:
        raise UsageError("this avatar was trained on every frame (train.holdout_fraction = 0): "
                         "nothing is held out to evaluate on")
    data = load_subject(ws, size)
    from .avatar.lpips import at_least_64, load_lpips

    lp = load_lpips()

    def lpips_of(a: np.ndarray, b: np.ndarray) -> float:
        ta, tb = (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).permute(2, 0, 1)[None] for x in (a, b))
        with torch.no_grad():
            return float(lp(*at_least_64(ta, tb))[0])

    names = list(avatars) + ["retrieval"]
    rows: dict[str, list] = {name: [] for name in names}
    images: dict[str, list] = {name: [] for name in names}
    seconds = {kind: 0.0 for kind in avatars}
    samples = {kind: 0 for kind in avatars}
    lmk_train = data.landmarks[train].reshape(len(train), -1)
    with quiet_native_stderr():
        det_real = _Landmarks()
        dets = {name: _Landmarks() for name in names}
    try:
        with progress.bar(f"eval {', '.join(avatars)}", len(hold), unit="frames") as bar, quiet_native_stderr():
            for f in hold:
                gt = data.images[f].astype(np.float32) / 255.0
                preds = {}
                for kind, (model, _, _) in avatars.items():
                    stats: dict = {}
                    t0 = time.perf_counter()
                    preds[kind], _ = render_frame(model, data.rotation[f], data.translation[f],
                                                  model.frame_input(data.landmarks, data.mesh, int(f)),
                                                  data.background, data.focal, data.cx, data.cy, torso=True,
                                                  stats=stats)
                    seconds[kind] += time.perf_counter() - t0
                    samples[kind] += stats.get("samples", 0)
                nn = int(train[np.argmin(np.linalg.norm(lmk_train - data.landmarks[f].reshape(1, -1), axis=1))])
                preds["retrieval"] = data.images[nn].astype(np.float32) / 255.0
                ref_pts = det_real(gt)
                for name, pred in preds.items():
                    mouth, full = _lmd(dets[name](pred), ref_pts)
                    row = {"frame": int(f), "psnr": psnr(pred, gt), "ssim": ssim(pred, gt), "lmd_mouth": mouth,
                           "lmd_face": full}
                    if lp is not None:
                        row["lpips"] = lpips_of(pred, gt)
                    rows[name].append(row)
                    images[name].append(pred)
                bar.advance()
    finally:
        for d in (det_real, *dets.values()):
            d.close()

    def mean(name: str, key: str) -> float:
        vals = np.array([r[key] for r in rows[name]], dtype=np.float64)
        return round(float(np.nanmean(vals)), 4) if np.isfinite(vals).any() else float("nan")

    keys = ("psnr", "ssim", "lmd_mouth", "lmd_face") + (("lpips",) if lp is not None else ())
    table = {name: {key: mean(name, key) for key in keys} for name in names}
    for kind, (model, _, _) in avatars.items():
        table[kind]["fps"] = round(len(hold) / seconds[kind], 2)
        table[kind]["fps_512"] = round(_fps_512(model, data, int(hold[0])), 2)
        flops = frame_flops(model, samples[kind] // len(hold), size * size)
        table[kind].update({"gflops": flops["gflops"], "flops": flops})
    pick = np.linspace(0, len(hold) - 1, min(sample_images, len(hold))).round().astype(int)
    sheet = np.concatenate([np.concatenate([data.images[hold[i]].astype(np.float32) / 255.0] +
                                           [images[name][i] for name in names], axis=1) for i in pick], axis=0)
    sheet = (sheet * 255 + 0.5).astype(np.uint8)
    if sheet.shape[1] < 256 * (len(names) + 1):
        s = 256 * (len(names) + 1) / sheet.shape[1]
        sheet = cv2.resize(sheet, None, fx=s, fy=s, interpolation=cv2.INTER_NEAREST)
    out = ws.path(EVAL_DIR if list(avatars) == ["r2talker"] else f"eval/{'+'.join(avatars)}")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "samples.png") as tmp:
        write_image(tmp, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    presets = {kind: p.name for kind, (_, p, _) in avatars.items()}
    result = {"workspace": str(ws.root), "model": "+".join(avatars), "models": list(avatars),
              "preset": ", ".join(presets.values()), "presets": presets, "size": size,
              "holdout_frames": [int(hold[0]), int(hold[-1])], "train_frames": int(len(train)),
              "metrics": table, "columns": ["real"] + names,
              "lpips": "measured (AlexNet LPIPS)" if lp is not None else "not measured (no LPIPS weights configured)",
              "per_frame": rows, "samples": str(out / "samples.png")}
    write_json(out / "results.json", result)
    return result


def _fps_512(model, data, f: int) -> float:
    """Render speed at 512² (one frame after a warm-up at that size)."""
    import cv2

    k = 512 / data.size
    bg512 = cv2.resize(data.background, (512, 512), interpolation=cv2.INTER_LINEAR)
    args = (model, data.rotation[f], data.translation[f], model.frame_input(data.landmarks, data.mesh, f), bg512,
            data.focal * k, data.cx * k, data.cy * k)
    render_frame(*args)
    t0 = time.perf_counter()
    render_frame(*args)
    return 1.0 / (time.perf_counter() - t0)

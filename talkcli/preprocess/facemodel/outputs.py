"""What a face fit becomes on disk: facefit.npz, transforms.json, quality numbers, tracking preview."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from .base import FaceFit, project
from .mesh import triangles, uv_layout

PROFILE_YAW_DEG = 45.0  # frames turned further than this are flagged and kept out of training
# Head frame (y down, z away from the camera) -> world frame (y up, z towards the frontal camera),
# the convention of FLAME and of nerfstudio scenes.
HEAD_TO_WORLD = np.diag([1.0, -1.0, -1.0])
OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])


def head_angles(rotation: np.ndarray) -> np.ndarray:
    """(N, 3) yaw, pitch, roll in degrees of the head as the camera sees it (0 = facing it)."""
    fwd = -rotation[:, :, 2]  # the head's facing direction in camera coordinates
    yaw = np.degrees(np.arctan2(fwd[:, 0], -fwd[:, 2]))
    pitch = np.degrees(np.arctan2(-fwd[:, 1], np.hypot(fwd[:, 0], fwd[:, 2])))
    x_axis = rotation[:, :, 0]
    roll = np.degrees(np.arctan2(x_axis[:, 1], x_axis[:, 0]))
    return np.stack([yaw, pitch, roll], axis=1).astype(np.float32)


def jitter(rotation: np.ndarray, translation: np.ndarray, ok: np.ndarray) -> dict:
    """Frame-to-frame second differences of rotation (degrees) and translation (mm)."""
    from scipy.spatial.transform import Rotation

    idx = np.flatnonzero(ok)
    runs = np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1)  # only consecutive tracked frames
    rot_dd, tr_dd = [], []
    for run in runs:
        if len(run) < 3:
            continue
        rv = Rotation.from_matrix(rotation[run].astype(np.float64)).as_rotvec()
        rot_dd.append(np.degrees(np.linalg.norm(rv[2:] - 2 * rv[1:-1] + rv[:-2], axis=1)))
        t = translation[run].astype(np.float64) * 1000.0
        tr_dd.append(np.linalg.norm(t[2:] - 2 * t[1:-1] + t[:-2], axis=1))
    if not rot_dd:
        return {"rotation_deg_mean": None, "rotation_deg_p95": None, "translation_mm_mean": None,
                "translation_mm_p95": None}
    r, t = np.concatenate(rot_dd), np.concatenate(tr_dd)
    return {"rotation_deg_mean": round(float(r.mean()), 4), "rotation_deg_p95": round(float(np.percentile(r, 95)), 4),
            "translation_mm_mean": round(float(t.mean()), 4),
            "translation_mm_p95": round(float(np.percentile(t, 95)), 4)}


def quality(fit: FaceFit, points: np.ndarray, image_size: tuple[int, int]) -> dict:
    """The numbers printed at the end of preprocess and stored in the manifest."""
    ok = fit.ok
    scale = 512.0 / image_size[0]  # errors are reported in pixels at 512²
    err = np.linalg.norm(fit.projected[ok] - points[ok, :, :2], axis=-1) * scale
    err = err[np.isfinite(err)]
    q = {
        "frames_tracked": int(ok.sum()),
        "frames_total": int(len(ok)),
        "tracked_fraction": round(float(ok.mean()), 4),
        "reprojection_px512_median": round(float(np.median(err)), 4),
        "reprojection_px512_p95": round(float(np.percentile(err, 95)), 4),
        "focal_px": round(fit.focal, 2),
        "jitter": jitter(fit.rotation, fit.translation, ok),
    }
    if "rotation_raw" in fit.extra:
        q["jitter_unsmoothed"] = jitter(fit.extra["rotation_raw"], fit.extra["translation_raw"], ok)
    if "explained_variance_ratio" in fit.extra:
        q["expression_components"] = int(fit.expression.shape[1])
        q["expression_variance_explained"] = round(float(fit.extra["explained_variance_ratio"].sum()), 4)
        q["components_for_95pct"] = int(fit.extra["components_for_95"])
    return q


def arrays(fit: FaceFit, train: np.ndarray, angles: np.ndarray) -> dict[str, np.ndarray]:
    """facefit.npz content (keys documented in docs/cli.md)."""
    out = {
        "model": np.array(fit.model),
        "rotation": fit.rotation, "translation": fit.translation, "expression": fit.expression,
        "shape": fit.shape, "focal": np.float64(fit.focal), "cx": np.float64(fit.cx), "cy": np.float64(fit.cy),
        "landmarks3d": fit.landmarks3d, "projected": fit.projected, "ok": fit.ok, "train": train,
        "angles": angles,
    }
    if fit.model == "builtin":
        neutral = fit.extra["neutral"]
        out["triangles"] = triangles(neutral)
        out["uv"] = uv_layout(neutral)
    for k, v in fit.extra.items():
        out[k] = np.asarray(v)
    return out


def transforms(fit: FaceFit, train: np.ndarray, image_size: tuple[int, int], fps: float,
               file_paths: list[str]) -> dict:
    """nerfstudio / instant-ngp ``transforms.json``: per-frame camera-to-world, head at the origin."""
    w, h = image_size
    frames = []
    for i in range(len(fit.ok)):
        r, t = fit.rotation[i].astype(np.float64), fit.translation[i].astype(np.float64)
        c2w = np.eye(4)
        c2w[:3, :3] = HEAD_TO_WORLD @ r.T
        c2w[:3, 3] = HEAD_TO_WORLD @ (-r.T @ t)
        c2w = c2w @ OPENCV_TO_OPENGL
        frames.append({
            "file_path": file_paths[i],
            "transform_matrix": np.round(c2w, 7).tolist(),
            "frame_index": i,
            "time": round(i / fps, 6),
            "tracked": bool(fit.ok[i]),
            "train": bool(train[i]),
        })
    return {
        "camera_model": "OPENCV",
        "fl_x": fit.focal, "fl_y": fit.focal, "cx": fit.cx, "cy": fit.cy, "w": w, "h": h,
        "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0,
        "units": "metres; world = head frame (x subject's left, y up, z towards the frontal camera)",
        "face_model": fit.model,
        "fps": fps,
        "frames": frames,
    }


def draw_tracking(rgb: np.ndarray, points: np.ndarray | None, proj: np.ndarray, tris: np.ndarray,
                  rotation: np.ndarray, translation: np.ndarray, focal: float, cx: float, cy: float) -> np.ndarray:
    """One preview frame: fitted mesh wireframe (blue), tracked landmarks (green), pose axes."""
    import cv2

    img = rgb.copy()
    s = 4  # sub-pixel drawing
    finite = np.isfinite(proj[:, :2]).all(axis=1)  # a FLAME fit projects only its embedded points
    pts = np.round(np.nan_to_num(proj[:, :2]) * (1 << s)).astype(np.int32)
    polys = [pts[t] for t in tris if finite[t].all()]
    cv2.polylines(img, polys, True, (70, 130, 255), 1, cv2.LINE_AA, shift=s)
    h, w = img.shape[:2]

    def dots(xy: np.ndarray, colour: tuple[int, int, int]) -> None:  # 2x2 px, vectorised
        xy = np.round(xy[np.isfinite(xy).all(axis=1)]).astype(np.int64)
        for dx in (0, 1):
            for dy in (0, 1):
                x, y = np.clip(xy[:, 0] + dx - 1, 0, w - 1), np.clip(xy[:, 1] + dy - 1, 0, h - 1)
                img[y, x] = colour

    dots(proj[finite & ~np.isin(np.arange(len(proj)), tris)], (70, 130, 255))
    if points is not None:
        dots(points[:, :2], (60, 230, 60))
    axes = np.array([[0, 0, 0], [0.06, 0, 0], [0, 0.06, 0], [0, 0, 0.06]], np.float64)
    axes_px = project(axes[None], rotation[None].astype(np.float64), translation[None].astype(np.float64),
                      focal, cx, cy)[0]
    o = tuple(int(v) for v in np.round(axes_px[0]))
    for k, colour in zip(range(1, 4), ((255, 60, 60), (60, 255, 60), (60, 60, 255))):
        cv2.line(img, o, tuple(int(v) for v in np.round(axes_px[k])), colour, 2, cv2.LINE_AA)
    return img


def write_tracking_preview(path: Path, frame_paths: list[Path], fit: FaceFit, points: np.ndarray, tris: np.ndarray,
                           fps: float, progress=None) -> None:
    from ...media.encode import VideoWriter
    from ..frameio import read_frames

    frames = read_frames(frame_paths)
    first = next(frames)
    h, w = first.shape[:2]
    with VideoWriter(path, fps, (w, h), crf=23, preset="veryfast") as vw:
        for i, rgb in enumerate(itertools.chain([first], frames)):
            pts = points[i] if fit.ok[i] else None
            vw.write(draw_tracking(rgb, pts, fit.projected[i], tris, fit.rotation[i], fit.translation[i],
                                   fit.focal, fit.cx, fit.cy))
            if progress is not None:
                progress.advance()

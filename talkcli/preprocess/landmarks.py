"""Per-frame 3D face landmarks: MediaPipe face mesh with refined (iris) landmarks, 478 points.

The mesh runs in tracking mode: it follows the face from frame to frame and re-runs its detector
by itself when the track is lost. With two faces in view the largest wins and the frame is
counted. ``landmarks.npz``:

    points      (N, 478, 3) float32  x, y in pixels of the workspace frames; z in the same pixel
                                     scale, relative to the face centre, smaller = nearer
    ibug68      (N, 68, 3) float32   the iBUG 68-point subset (``ibug68_index`` into the 478); with
                                     --landmarks face-alignment, x and y come from FAN
    ibug68_backend  str              mediapipe or face-alignment
    ok          (N,) bool            a face was tracked in the frame (points are NaN otherwise)
    visible     (N, 478) bool        the vertex has a face towards the camera (self-occlusion)
    n_faces     (N,) int16           faces the mesh found
    fast        (N,) bool            head moved faster than FAST_MOTION face sizes per frame
    motion      (N,) float32         median displacement of the stable points from the previous
                                     frame, pixels
    image_size  (2,) int             width, height of the frames
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

from .detect import quiet_native_stderr
from .facemodel.mesh import IBUG68, N_LANDMARKS, STABLE, triangles, visible_vertices

FAST_MOTION = 0.08  # fraction of the face size per frame (0.08 at 25 fps ≈ 2 face widths per second)


@dataclasses.dataclass
class LandmarkTrack:
    points: np.ndarray
    ok: np.ndarray
    n_faces: np.ndarray
    image_size: tuple[int, int]
    ibug68_xy: np.ndarray | None = None  # (N, 68, 2) from the face-alignment backend, when used

    def arrays(self) -> dict[str, np.ndarray]:
        pts = self.points
        tris = triangles(np.nanmedian(pts[self.ok], axis=0)) if self.ok.any() else None
        visible = np.zeros(pts.shape[:2], bool)
        if tris is not None:
            for i in np.flatnonzero(self.ok):
                visible[i] = visible_vertices(pts[i], tris)
        motion, fast = motion_flags(pts, self.ok)
        ibug68 = pts[:, IBUG68].copy()
        if self.ibug68_xy is not None:  # FAN's 2D points, mediapipe's depth for the same landmarks
            ibug68[..., :2] = self.ibug68_xy
        return {
            "points": pts,
            "ibug68": ibug68,
            "ibug68_backend": np.array("face-alignment" if self.ibug68_xy is not None else "mediapipe"),
            "ibug68_index": IBUG68,
            "ok": self.ok,
            "visible": visible,
            "n_faces": self.n_faces,
            "fast": fast,
            "motion": motion,
            "image_size": np.array(self.image_size, np.int64),
        }


def motion_flags(points: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame head displacement (pixels) and a flag where it exceeds FAST_MOTION face sizes."""
    n = len(points)
    motion = np.zeros(n, np.float32)
    fast = np.zeros(n, bool)
    for i in range(1, n):
        if ok[i] and ok[i - 1]:
            d = np.linalg.norm(points[i, STABLE, :2] - points[i - 1, STABLE, :2], axis=1)
            motion[i] = float(np.median(d))
            face = np.ptp(points[i, :468, 0])
            fast[i] = motion[i] > FAST_MOTION * face
    return motion, fast


class FaceMesh:
    def __init__(self):
        with quiet_native_stderr():
            import mediapipe as mp

            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=False, max_num_faces=2, refine_landmarks=True,
                min_detection_confidence=0.5, min_tracking_confidence=0.5)
            self._mesh.process(np.zeros((64, 64, 3), np.uint8))  # first-inference logs, silenced

    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray | None, int]:
        h, w = rgb.shape[:2]
        res = self._mesh.process(rgb)
        faces = res.multi_face_landmarks or []
        best, best_area = None, -1.0
        for face in faces:
            p = np.array([(lm.x * w, lm.y * h, lm.z * w) for lm in face.landmark], np.float32)
            area = float(np.ptp(p[:, 0]) * np.ptp(p[:, 1]))
            if area > best_area:
                best, best_area = p, area
        return best, len(faces)

    def close(self) -> None:
        self._mesh.close()


def track(frames: Iterable[np.ndarray], n: int, progress=None, ibug68_model=None) -> LandmarkTrack:
    """Track every frame; ``ibug68_model(rgb, points478) -> (68, 2)`` optionally gives the 68 subset."""
    points = np.full((n, N_LANDMARKS, 3), np.nan, np.float32)
    counts = np.zeros(n, np.int16)
    ibug = np.full((n, 68, 2), np.nan, np.float32) if ibug68_model is not None else None
    size = (0, 0)
    mesh = FaceMesh()
    try:
        for i, rgb in enumerate(frames):
            size = (rgb.shape[1], rgb.shape[0])
            p, counts[i] = mesh(rgb)
            if p is not None:
                points[i] = p
                if ibug is not None:
                    ibug[i] = ibug68_model(rgb, p)
            if progress is not None:
                progress.advance()
    finally:
        mesh.close()
    return LandmarkTrack(points, ~np.isnan(points[:, 0, 0]), counts, size, ibug)

"""Face detection over the clip and the one crop box used for every frame.

MediaPipe's face detector (bundled in the mediapipe 0.10.21 wheel, no download) runs on every
working-rate frame, downscaled for speed. The short-range model is tried first (talking heads are
close to the camera); frames where it finds nothing get a second try with the full-range model.
When several faces are found the largest wins and the frame is counted as multi-face.

The crop is a single square for the whole clip so that the camera of the avatar stays fixed:
face boxes are gap-filled and median-filtered over about a second (detector noise and brief
failures do not move it), the box is centred a little below the median face centre (neck and
shoulders belong to the avatar's torso), sized to ``crop_scale`` face heights and grown until it
holds every smoothed face box with a margin, then clamped to the frame.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Iterator

import numpy as np

from ..config import PreprocessConfig, parse_crop
from ..errors import InputError, UsageError
from ..media.decode import CropBox
from ..media.probe import MediaInfo


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence the C++ logging (absl/glog/TFLite) that mediapipe writes straight to fd 2.

    mediapipe logs on its first inferences, so whole processing loops run inside this. Our own
    terminal output (progress bars, warnings) is moved to a duplicate of the real stderr meanwhile.
    """
    from .. import progress

    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    # the console's own setting (None: follow sys.stderr), not the stream it resolves to now
    console_file = progress.console._file
    real = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace")
    try:
        sys.stderr.flush()
        os.dup2(devnull, 2)
        progress.console.file = real
        yield
    finally:
        progress.console._file = console_file
        real.close()
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@dataclasses.dataclass
class FaceTrack:
    """Per working-rate frame: the chosen face box in displayed source pixels."""

    boxes: np.ndarray  # (N, 4) float32 x, y, w, h; NaN where no face
    scores: np.ndarray  # (N,) float32, 0 where no face
    n_faces: np.ndarray  # (N,) int16

    @property
    def ok(self) -> np.ndarray:
        return ~np.isnan(self.boxes[:, 0])


class FaceDetector:
    def __init__(self, min_confidence: float = 0.5):
        with quiet_native_stderr():
            import mediapipe as mp

            fd = mp.solutions.face_detection
            self._short = fd.FaceDetection(model_selection=0, min_detection_confidence=min_confidence)
            self._full = fd.FaceDetection(model_selection=1, min_detection_confidence=min_confidence)
            # The TFLite runtime logs on the first inference: run it here, silenced.
            blank = np.zeros((64, 64, 3), np.uint8)
            self._short.process(blank)
            self._full.process(blank)

    def detect(self, rgb: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        """Faces as (x, y, w, h, score) in pixels of ``rgb``, largest first."""
        h, w = rgb.shape[:2]
        result = self._short.process(rgb)
        if not result.detections:
            result = self._full.process(rgb)
        faces = []
        for d in result.detections or []:
            b = d.location_data.relative_bounding_box
            faces.append((b.xmin * w, b.ymin * h, b.width * w, b.height * h, float(d.score[0])))
        faces.sort(key=lambda f: f[2] * f[3], reverse=True)
        return faces

    def close(self) -> None:
        self._short.close()
        self._full.close()


def detect_faces(frames: Iterator[np.ndarray], n: int, scale: float, progress=None) -> FaceTrack:
    """Run the detector on ``n`` frames; ``scale`` maps frame pixels back to source pixels."""
    boxes = np.full((n, 4), np.nan, np.float32)
    scores = np.zeros(n, np.float32)
    counts = np.zeros(n, np.int16)
    det = FaceDetector()
    try:
        for i, rgb in enumerate(frames):
            faces = det.detect(rgb)
            counts[i] = len(faces)
            if faces:
                x, y, w, h, s = faces[0]
                boxes[i] = np.array([x, y, w, h]) * scale
                scores[i] = s
            if progress is not None:
                progress.advance(1)
    finally:
        det.close()
    return FaceTrack(boxes, scores, counts)


def _median_filter_1d(x: np.ndarray, window: int) -> np.ndarray:
    from scipy.ndimage import median_filter

    return median_filter(x, size=window, mode="nearest")


def smooth_boxes(track: FaceTrack, fps: float) -> np.ndarray:
    """Gap-filled, median-filtered (cx, cy, size) per frame."""
    ok = track.ok
    idx = np.arange(len(ok))
    b = track.boxes
    cx = b[:, 0] + b[:, 2] / 2
    cy = b[:, 1] + b[:, 3] / 2
    size = np.maximum(b[:, 2], b[:, 3])
    out = []
    window = max(3, int(round(fps)) | 1)
    for v in (cx, cy, size):
        filled = np.interp(idx, idx[ok], v[ok])
        out.append(_median_filter_1d(filled, window))
    return np.stack(out, axis=1)


def choose_crop(track: FaceTrack, info: MediaInfo, cfg: PreprocessConfig) -> tuple[CropBox, dict]:
    """The clip's crop box and the numbers behind it."""
    assert info.video is not None
    W, H = info.video.width, info.video.height
    n = len(track.ok)
    found = int(track.ok.sum())
    fraction = found / max(1, n)
    stats = {
        "frames": n,
        "frames_with_face": found,
        "face_fraction": round(fraction, 4),
        "multi_face_frames": int((track.n_faces > 1).sum()),
    }
    if cfg.crop == "full":
        side = min(W, H)
        return CropBox((W - side) // 2, (H - side) // 2, side, side), {**stats, "method": "full"}
    if cfg.crop != "auto":
        x, y, side = parse_crop(cfg.crop)
        if x + side > W or y + side > H:
            raise UsageError(f"--crop {cfg.crop} reaches outside the {W}x{H} frame")
        return CropBox(x, y, side, side), {**stats, "method": "manual"}
    if fraction < cfg.min_face_fraction:
        raise InputError(
            f"no face found in {n - found} of {n} frames ({100 * (1 - fraction):.0f}%); talkcli needs one "
            f"visible face in at least {100 * cfg.min_face_fraction:.0f}% of the frames "
            "(or pass --crop full or --crop x,y,side to skip detection)"
        )
    s = smooth_boxes(track, info.video.avg_fps or cfg.fps)
    cx, cy, size = s[:, 0], s[:, 1], s[:, 2]
    face = float(np.median(size))
    centre_x = float(np.median(cx))
    centre_y = float(np.median(cy)) + cfg.crop_shift * face
    side = cfg.crop_scale * face
    # Grow until every smoothed face box, with a 20% margin, lies inside.
    need_x = np.max(np.abs(cx - centre_x) + 0.6 * size)
    need_y = np.max(np.abs(cy - centre_y) + 0.6 * size)
    side = max(side, 2 * float(need_x), 2 * float(need_y))
    side = int(min(round(side), W, H)) // 2 * 2
    x0 = int(round(min(max(centre_x - side / 2, 0), W - side)))
    y0 = int(round(min(max(centre_y - side / 2, 0), H - side)))
    return CropBox(x0, y0, side, side), {**stats, "method": "auto", "face_size_px": round(face, 1)}

"""``talk render``: a motion track -> an H.264 MP4 of the subject, with the track's sound muxed.

    track (landmarks or meshes, poses) --avatar.condition + render_frame--> RGB frames
      (head + torso over the background plate, or pasted into the subject's own frames)
      --VideoWriter (ffmpeg, streamed, atomic)--> out.mp4 with AAC audio from frame 0

Frames are rendered one at a time and piped to ffmpeg: memory does not grow with the length.
``--background source`` dubs the subject's own video: the rendered head is blended into the
workspace frames (played forward and back like ``--pose source``) through its opacity, eroded
and feathered, after shifting its colours to match the frame in a band along the edge of the
head, so that no seam shows at the jaw and neck.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import progress
from .drive import Track
from .errors import UsageError
from .workspace import Workspace

BACKGROUNDS = ("plate", "source")


def _paste(render: np.ndarray, frame: np.ndarray, opacity: np.ndarray) -> np.ndarray:
    """Blend the rendered head into a real frame (all float32 in [0, 1], same size)."""
    import cv2

    s = frame.shape[0]
    k = max(1, s // 128)
    m = cv2.erode(opacity.astype(np.float32), np.ones((2 * k + 1, 2 * k + 1), np.uint8))
    m = cv2.GaussianBlur(m, (0, 0), sigmaX=1.5 * k)
    band = (m > 0.3) & (m < 0.9)  # just inside the edge: where a colour difference would show
    if band.sum() > 20:
        shift = (frame[band] - render[band]).mean(0)
        render = np.clip(render + shift[None, None] * m[..., None], 0, 1)
    return render * m[..., None] + frame * (1 - m[..., None])


def run(ws: Workspace, track: Track, out: Path, *, size: int | None = None, crf: int = 18,
        background: str = "plate", model_kind: str = "r2talker") -> dict:
    import cv2

    from .avatar.data import load_subject
    from .avatar.render import render_frame
    from .media.encode import VideoWriter
    from .motion.pose import ping_pong
    from .train import load_model, model_file

    if background not in BACKGROUNDS:
        raise UsageError(f"--background must be one of {', '.join(BACKGROUNDS)}")
    model, preset, _ = load_model(ws.path(model_file(model_kind)))
    mesh = track.meshes(ws) if model.kind == "meshhash" else None
    train_size = preset.train.size
    size = size or train_size
    if size < 16 or size % 2:
        raise UsageError(f"--size must be an even number of pixels >= 16, got {size}")
    data = load_subject(ws, train_size)
    k = size / train_size
    focal, cx, cy = data.focal * k, data.cx * k, data.cy * k
    plate = cv2.resize(data.background, (size, size), interpolation=cv2.INTER_LINEAR)
    n = track.n_frames
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    src_idx = ping_pong(data.n_frames, n)
    t0 = time.perf_counter()
    with VideoWriter(out, track.fps, (size, size), audio=track.audio or None, crf=crf) as vw, \
            progress.bar("render", n, unit="frames") as bar:
        for t in range(n):
            cond = model.frame_input(track.landmarks, mesh, t)
            if background == "source":
                f = int(src_idx[t])
                frame = cv2.resize(data.images[f], (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
                img, op = render_frame(model, data.rotation[f], data.translation[f], cond, frame,
                                       focal, cx, cy, torso=False)
                img = _paste(img, frame, op)
            else:
                img, _ = render_frame(model, track.rotation[t], track.translation[t], cond, plate,
                                      focal, cx, cy, torso=True)
            vw.write((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
            bar.advance()
    seconds = time.perf_counter() - t0
    return {"output": str(out), "frames": n, "fps": track.fps, "duration": round(n / track.fps, 3),
            "audio_seconds": round(track.seconds, 3), "size": size, "source": track.source, "pose": track.pose,
            "background": background, "model": model.kind, "has_audio": bool(track.audio), "seconds": round(seconds, 2),
            "fps_achieved": round(n / seconds, 2)}

"""Drive the subject with its own held-out audio and compare the rendered mouth with the real one.

    python bench/drive_holdout.py WORKSPACE [--model meshhash]   # after `talk train` (avatar + motion)

For the held-out frames (the last 10% of the clip, never trained on), three motion tracks are
rendered with the real head poses: the audio-to-motion model's prediction from the audio, the
mean expression, and nearest-neighbour retrieval on the audio features. mediapipe reads the mouth
of every rendered frame and of the real frame (both at the training size, upscaled to 512):
mouth-opening correlation with the real frames, mouth LMD (px at 512), and render speed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from talkcli.avatar.data import load_subject  # noqa: E402
from talkcli.avatar.render import render_frame  # noqa: E402
from talkcli.evaluate import _Landmarks, _lmd  # noqa: E402
from talkcli.motion import stage  # noqa: E402
from talkcli.preprocess.detect import quiet_native_stderr  # noqa: E402
from talkcli.motion.mesh import mesh_from_landmarks  # noqa: E402
from talkcli.train import AVATARS, load_model, model_file  # noqa: E402
from talkcli.workspace import Workspace  # noqa: E402


def opening(p):
    return float(np.linalg.norm(p[62] - p[66])) if p is not None else np.nan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--model", default="r2talker", choices=AVATARS)
    args = ap.parse_args()
    ws = Workspace(args.workspace)
    model, preset, payload = load_model(ws.path(model_file(args.model)))
    data = load_subject(ws, preset.train.size)
    mdata, lmk, neutral, scale, train, hold = stage.subject_data(ws, preset.train.holdout_fraction)
    motion = stage.load(ws.path(stage.MOTION_FILE))
    pred = neutral + motion.predict_offsets(mdata.features) * scale
    nn = stage.audio_retrieval(mdata.features, train, np.arange(len(lmk)))
    tracks = {"audio2motion": pred, "mean expression": np.broadcast_to(neutral, lmk.shape),
              "audio retrieval": lmk[nn], "tracked (upper bound)": lmk}
    with quiet_native_stderr():
        det = {name: _Landmarks() for name in [*tracks, "real"]}
    real_pts = []
    rows = {}
    with quiet_native_stderr():
        for f in hold:
            real_pts.append(det["real"](data.images[f].astype(np.float32) / 255))
        for name, track in tracks.items():
            ops, lmds, secs = [], [], 0.0
            track = np.asarray(track, dtype=np.float32)
            # the mesh-anchored avatar reads meshes: the tracked ones, or fitted to the track's landmarks
            mesh = data.mesh if name.startswith("tracked") else \
                (mesh_from_landmarks(ws, track) if model.kind == "meshhash" else None)
            for i, f in enumerate(hold):
                t0 = time.perf_counter()
                img, _ = render_frame(model, data.rotation[f], data.translation[f],
                                      model.frame_input(track, mesh, int(f)), data.background, data.focal, data.cx,
                                      data.cy)
                secs += time.perf_counter() - t0
                p = det[name](img)
                ops.append(opening(p))
                lmds.append(_lmd(p, real_pts[i])[0])
            real_ops = np.array([opening(p) for p in real_pts])
            ops = np.array(ops)
            ok = np.isfinite(ops) & np.isfinite(real_ops)
            corr = float(np.corrcoef(ops[ok], real_ops[ok])[0, 1]) if ok.sum() > 2 and ops[ok].std() > 0 else 0.0
            rows[name] = (corr, float(np.nanmean(lmds)), float(np.nanstd(ops)), len(hold) / secs)
    print(f"{model.kind}: held-out frames {hold[0]}-{hold[-1]} at {data.size}², driven by their own audio; "
          "real poses.\n")
    print("| motion | mouth-opening correlation | mouth LMD px@512 | opening std px | render FPS |")
    print("|---|---:|---:|---:|---:|")
    for name, (c, l, s, fps) in rows.items():
        print(f"| {name} | {c:.2f} | {l:.2f} | {s:.1f} | {fps:.1f} |")
    print(f"| real frames | 1.00 | 0 | {np.nanstd(real_ops):.1f} | |")


if __name__ == "__main__":
    main()

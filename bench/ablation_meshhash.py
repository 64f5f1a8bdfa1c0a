"""The mesh-anchored avatar's ablation in small (the paper's blendshape count and k-NN study).

    python bench/ablation_meshhash.py WORKSPACE [--preset meshhash-cpu] [--iterations 1200]

1. Blendshapes per vertex: M = 1, 3, 5 hash tables per anchor, each trained from scratch on a copy
   of the workspace at the same budget and scored by ``talk eval``'s code on the held-out frames.
2. Sampling in training: occupancy-grid marching (the CPU preset's) vs 32 coarse + 32 fine
   hierarchical samples (the paper's), M = 5, same budget: train time and held-out quality.
3. k-NN at render time on the M = 5 avatar: the hierarchical search grid (64^3 and 32^3 cells,
   K' = 12) vs brute force over all anchors, rendering the same held-out frames: frames per
   second and PSNR (the paper: +36% FPS for the hierarchical search).

Prints markdown tables.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from variants import train_variant, variant_args  # noqa: E402

from talkcli import evaluate, progress, train  # noqa: E402
from talkcli.avatar.data import load_subject  # noqa: E402
from talkcli.avatar.metrics import psnr  # noqa: E402
from talkcli.avatar.render import render_frame  # noqa: E402
from talkcli.ops.knn import KnnGridSpec  # noqa: E402
from talkcli.workspace import Workspace  # noqa: E402

VARIANTS = [
    ("M = 1", ["model.n_blend=1"]),
    ("M = 3", ["model.n_blend=3"]),
    ("M = 5", ["model.n_blend=5"]),
    ("M = 5, hierarchical 32 + 32", ["model.n_blend=5", "train.sampling=hierarchical"]),
]


def knn_study(ws: Workspace) -> list[tuple]:
    model, preset, payload = train.load_model(ws.path(train.model_file("meshhash")))
    data = load_subject(ws, preset.train.size)
    hold = payload["holdout_frames"]
    rows = []
    for name, knn, res in (("grid 64^3, K' 12", "grid", 64), ("grid 32^3, K' 12", "grid", 32),
                           ("brute force", "brute", 64)):
        m = dataclasses.replace(model.cfg, knn=knn, knn_resolution=res)
        model.cfg = model.head.cfg = m
        model.head.knn_spec = KnnGridSpec(resolution=res, candidates=m.knn_candidates, k=m.knn_k)
        scores, seconds = [], 0.0
        for rep in range(2):  # the first pass warms up
            scores, seconds = [], 0.0
            for f in hold:
                t0 = time.perf_counter()
                img, _ = render_frame(model, data.rotation[f], data.translation[f], data.mesh[f], data.background,
                                      data.focal, data.cx, data.cy)
                seconds += time.perf_counter() - t0
                scores.append(psnr(img, data.images[f].astype(np.float32) / 255.0))
        rows.append((name, len(hold) / seconds, float(np.mean(scores))))
        print(f"{name}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    args = variant_args(__doc__, "meshhash-cpu", 1200, 200)
    progress.set_quiet(True)
    rows, knn_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in VARIANTS:
            ws, summary, seconds = train_variant(args.workspace, Path(tmp), args.preset, overrides,
                                                 args.iterations, args.torso_iterations)
            res = evaluate.run(ws, ["meshhash"])
            if name == "M = 5":
                knn_rows = knn_study(ws)
            m = res["metrics"]["meshhash"]
            rows.append((name, m, seconds, summary.get("train_psnr_last")))
            print(f"{name}: {m} ({seconds:.0f} s)", file=sys.stderr, flush=True)
            base = res["metrics"]["retrieval"]
    print(f"Preset {args.preset}, {args.iterations} head + {args.torso_iterations} torso iterations, "
          f"held-out frames {res['holdout_frames'][0]}-{res['holdout_frames'][1]} at {res['size']}²\n")
    print("| variant | PSNR dB | SSIM | LMD mouth px | LMD face px | FPS | GFLOPs/frame | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, m, s, _ in rows:
        print(f"| {name} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['lmd_mouth']:.2f} | {m['lmd_face']:.2f} | "
              f"{m['fps']:.1f} | {m['gflops']:.3f} | {s:.0f} |")
    print(f"| retrieval baseline | {base['psnr']:.2f} | {base['ssim']:.4f} | {base['lmd_mouth']:.2f} | "
          f"{base['lmd_face']:.2f} | | | |")
    print("\n| k-NN at render (M = 5 avatar) | FPS | PSNR dB |")
    print("|---|---:|---:|")
    for name, fps, p in knn_rows:
        print(f"| {name} | {fps:.2f} | {p:.2f} |")


if __name__ == "__main__":
    main()

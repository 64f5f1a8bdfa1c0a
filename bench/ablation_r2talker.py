"""R2-Talker ablation in small (the paper's Table 4) on one preprocessed workspace.

    python bench/ablation_r2talker.py WORKSPACE [--preset r2talker-cpu] [--iterations 2000]

Four variants at the same iteration budget, each trained from scratch on a copy of the workspace
and evaluated by ``talk eval``'s code on the held-out frames:

1. concat: raw landmark coordinates -> FCs -> condition concatenated to the MLP input (the
   GeneFace++/RAD-NeRF-style baseline, GLO);
2. + landmark encoder: the hash-grid landmark encoding, still concatenated;
3. + M-AGLO: the condition modulates every hidden layer;
4. + progressive: coarse-to-fine hash levels (the full R2-Talker).

Prints a markdown table (PSNR, SSIM, LMD mouth / face, train seconds).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from variants import train_variant, variant_args  # noqa: E402

from talkcli import evaluate, progress  # noqa: E402

VARIANTS = [
    ("concat (flat landmarks, GLO)", ["model.encoder=flat", "model.conditioning=concat", "model.progressive=false"]),
    ("+ landmark encoder", ["model.encoder=hashgrid", "model.conditioning=concat", "model.progressive=false"]),
    ("+ M-AGLO", ["model.encoder=hashgrid", "model.conditioning=maglo", "model.progressive=false"]),
    ("+ progressive", ["model.encoder=hashgrid", "model.conditioning=maglo", "model.progressive=true"]),
]


def main() -> None:
    args = variant_args(__doc__, "r2talker-cpu", 2000, 300)
    progress.set_quiet(True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in VARIANTS:
            ws, _, seconds = train_variant(args.workspace, Path(tmp), args.preset, overrides, args.iterations,
                                           args.torso_iterations)
            res = evaluate.run(ws)
            m = res["metrics"]["r2talker"]
            rows.append((name, m, seconds))
            print(f"{name}: {m} ({seconds:.0f} s)", file=sys.stderr, flush=True)
            base = res["metrics"]["retrieval"]
    print(f"Preset {args.preset}, {args.iterations} head + {args.torso_iterations} torso iterations, "
          f"held-out frames {res['holdout_frames'][0]}-{res['holdout_frames'][1]} at {res['size']}²\n")
    print("| variant | PSNR dB | SSIM | LMD mouth px | LMD face px | train s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m, s in rows:
        print(f"| {name} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['lmd_mouth']:.2f} | {m['lmd_face']:.2f} | {s:.0f} |")
    print(f"| retrieval baseline | {base['psnr']:.2f} | {base['ssim']:.4f} | {base['lmd_mouth']:.2f} | "
          f"{base['lmd_face']:.2f} | |")


if __name__ == "__main__":
    main()

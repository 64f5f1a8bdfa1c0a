"""What the audio-to-motion model's choices are worth on held-out frames.

    python bench/motion.py WORKSPACE [WORKSPACE ...]   # preprocessed workspaces with sound

For each feature source and lag range, the model is selected by cross-validation on the training
frames exactly as ``talk train`` does, then scored on the held-out frames (the last 10%): mouth
landmark error (mm) and mouth-opening correlation, beside the mean expression and audio retrieval.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from talkcli.motion import phonetic, stage  # noqa: E402
from talkcli.motion.audio2motion import MotionConfig, fit  # noqa: E402
from talkcli.workspace import Workspace  # noqa: E402


def describe(sel: dict) -> str:
    if sel["kind"] == "ensemble":
        return "mean of " + " and ".join(describe(m) for m in sel["members"]) + f", gain {sel['gain']:g}"
    return (f"{sel['source']} {sel['kind']} " + (f"k={sel['neighbours']}" if sel["kind"] == "knn" else f"λ={sel['ridge']:g}")
            + f", c={sel['context']}, lag={sel['lag']}, σ={sel['smoothing']}"
            + (f", {sel['bands']} bands" if sel["source"] == "mel" else "")
            + (f", gain {sel['gain']:g}" if sel.get("gain", 1) != 1 else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspaces", type=Path, nargs="+")
    args = ap.parse_args()
    full = MotionConfig()
    variants = {"mel, no lag": dataclasses.replace(full, sources=("mel",), lags=(0,)),
                "mel, lag 0-6": dataclasses.replace(full, sources=("mel",)),
                "visemes, no lag": dataclasses.replace(full, sources=("visemes",), lags=(0,)),
                "visemes, lag 0-6": dataclasses.replace(full, sources=("visemes",)),
                "both, lag 0-6, best of each or their mean (default)": full}
    if not phonetic.available():
        variants = {k: v for k, v in variants.items() if "visemes" not in k and "both" not in k}
    for root in args.workspaces:
        data, lmk, neutral, scale, train, hold = stage.subject_data(Workspace(root), 0.1)
        print(f"\n{root.name}: train on {len(train)} frames, held-out frames {hold[0]}-{hold[-1]}")
        print("| model | selected | CV score | mouth mm | opening corr | opening std mm | fit s |\n"
              "|---|---|---:|---:|---:|---:|---:|")
        for name, cfg in variants.items():
            t0 = time.perf_counter()
            model = fit([data], cfg)
            secs = time.perf_counter() - t0
            ev = stage.evaluate(model, data, lmk, neutral, scale, train, hold)
            print(f"| {name} | {describe(ev['selected'])} | {ev['selected']['cv_score']:.3f} | "
                  f"{ev['audio2motion']['mouth_mm']:.2f} | {ev['audio2motion']['opening_corr']:.2f} | "
                  f"{ev['audio2motion']['opening_std_mm']:.2f} | {secs:.1f} |")
        for base in ("mean_expression", "audio_retrieval"):
            print(f"| {base.replace('_', ' ')} | | | {ev[base]['mouth_mm']:.2f} | {ev[base]['opening_corr']:.2f} | "
                  f"{ev[base]['opening_std_mm']:.2f} | |")
        print(f"| tracked | | | | | {ev['tracked']['opening_std_mm']:.2f} | |")


if __name__ == "__main__":
    main()

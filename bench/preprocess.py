"""Preprocess speed: seconds of wall time per second of input video, per stage.

    python bench/preprocess.py [--size 512] [--repeat 2] [VIDEO ...]

Runs every stage from scratch (``--force``) in a temporary workspace, through the same function
``talk preprocess`` calls, and prints a Markdown table for docs/benchmarks.md. The default inputs
are the two fixture clips. The first run in a process pays one-time imports (mediapipe, librosa);
with --repeat N the table reports the fastest of N runs per stage.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    from conftest import CLIP, VFR_CLIP  # the fixture locations, resolved the same way as the tests

    from talkcli import progress
    from talkcli.config import PreprocessConfig
    from talkcli.preprocess import pipeline
    from talkcli.workspace import Workspace

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("videos", nargs="*", type=Path, default=[CLIP, VFR_CLIP])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--frame-format", default="png")
    args = ap.parse_args()
    progress.set_quiet(True)

    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    print(f"command: python bench/preprocess.py --size {args.size} --repeat {args.repeat}\n")
    stages = list(pipeline.CODE_VERSIONS)
    print("| input | video s | frames | " + " | ".join(stages) + " | total | s per input s |")
    print("|---" * (len(stages) + 5) + "|")
    cfg = PreprocessConfig(size=args.size, frame_format=args.frame_format)
    for video in args.videos:
        best: dict[str, float] = {}
        total_best = float("inf")
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as tmp:
                ws = Workspace(Path(tmp) / "ws")
                with ws.locked("bench"):
                    summary = pipeline.run(ws, video, cfg, force=True)
            for name, s in summary["stages"].items():
                best[name] = min(best.get(name, float("inf")), s["seconds"])
            total_best = min(total_best, summary["seconds"])
        duration = summary["frames"] / summary["fps"]
        cells = " | ".join(f"{best[s]:.2f}" for s in stages)
        print(f"| {video.name} | {duration:.2f} | {summary['frames']} | {cells} | {total_best:.2f} | "
              f"{total_best / duration:.3f} |")


if __name__ == "__main__":
    main()

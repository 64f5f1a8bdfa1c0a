"""One ablation variant: a fresh copy of a preprocessed workspace, trained from scratch with a
preset and overrides at a given budget (shared by the ablation scripts)."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from talkcli import train
from talkcli.avatar.config import load_preset
from talkcli.workspace import Workspace


def train_variant(source: Path, tmp: Path, preset_name: str, overrides: list[str], iterations: int,
                  torso_iterations: int) -> tuple[Workspace, dict, float]:
    """(workspace, train summary, seconds) of one variant trained in ``tmp/ws`` (replaced each
    call; the models and evals of ``source`` are not copied). The caller holds no lock: this
    takes the workspace's own and releases it."""
    ws_path = Path(tmp) / "ws"
    if ws_path.exists():
        shutil.rmtree(ws_path)
    shutil.copytree(source, ws_path, ignore=shutil.ignore_patterns("models", "eval"))
    ws = Workspace(ws_path)
    preset = load_preset(preset_name, overrides + [f"train.iterations={iterations}",
                                                   f"train.torso_iterations={torso_iterations}",
                                                   "train.val_every=1000000"])
    t0 = time.time()
    with ws.locked("ablation"):
        summary = train.run(ws, preset, force=True)
    return ws, summary, time.time() - t0


def variant_args(doc: str, preset: str, iterations: int, torso_iterations: int) -> argparse.Namespace:
    """The ablation scripts' command line: WORKSPACE [--preset] [--iterations] [--torso-iterations]."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--preset", default=preset)
    ap.add_argument("--iterations", type=int, default=iterations)
    ap.add_argument("--torso-iterations", type=int, default=torso_iterations)
    return ap.parse_args()

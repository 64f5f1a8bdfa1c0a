"""Shared test helpers: where the real fixture media lives, and running the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _fixtures_dir() -> Path:
    candidates = [os.environ.get("TALKCLI_FIXTURES"), REPO.parent / "shared" / "fixtures", "/work/shared/fixtures"]
    for c in candidates:
        if c and (Path(c) / "talking-head-512.mp4").is_file():
            return Path(c)
    raise RuntimeError("test media not found: set TALKCLI_FIXTURES to the shared fixtures directory "
                       "(it holds talking-head-512.mp4)")


FIXTURES = _fixtures_dir()
CLIP = FIXTURES / "talking-head-512.mp4"
VFR_CLIP = FIXTURES / "talking-head-vfr-700.mp4"
WAV_16K = FIXTURES / "speech-16k-stereo-8s.wav"
WAV_24BIT = FIXTURES / "speech-48k-24bit-6s.wav"


def talk(*args: str, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real ``talk`` command (as ``python -m talkcli.cli``) and capture its output."""
    proc = subprocess.run([sys.executable, "-m", "talkcli.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"talk {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def interrupt_at(trainer, iteration: int) -> None:
    """Run an avatar trainer until Ctrl-C arrives at ``iteration`` (the user pressing it)."""
    real_step = trainer.step

    def step(it):
        if it == iteration:
            raise KeyboardInterrupt
        return real_step(it)

    trainer.step = step
    with pytest.raises(KeyboardInterrupt):
        trainer.run()


def unshare_works() -> bool:
    """Whether user + mount namespaces are allowed here (a private tmpfs for disk-full tests)."""
    import shutil

    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def copy_with_fresh_mtimes(src: Path, dst: Path) -> None:
    """What cp -r, scp, rsync without -t or a cloud download do: the same bytes, new mtimes."""
    import shutil
    import time

    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    later = time.time_ns() + 5 * 10**9
    for p in [dst, *dst.rglob("*")]:
        os.utime(p, ns=(later, later))


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def ext():
    """The native CPU kernels (tests of an op skip when they cannot be built here)."""
    from talkcli.errors import NotAvailable
    from talkcli.ops import _native

    try:
        return _native.load("cpu")
    except NotAvailable as exc:
        pytest.skip(f"native kernels unavailable: {exc}")


@pytest.fixture(scope="session")
def cuda_ext():
    """The native CUDA kernels, or a skip without a CUDA device."""
    import torch

    from talkcli.errors import NotAvailable
    from talkcli.ops import _native

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    try:
        return _native.load("cuda")
    except NotAvailable as exc:
        pytest.skip(f"CUDA kernels unavailable: {exc}")


# A seconds-long subject for the fault and damaged-file tests: 3 s of the clip at 64², trained with
# the tiny preset (checkpoints every 10 iterations); a copy of the workspace from before training.
TINY_TRAIN = ("--preset", "r2talker-tiny", "--set", "train.iterations=40", "--set", "train.torso_iterations=10",
              "--set", "train.checkpoint_every=10", "--set", "train.val_every=20")


@pytest.fixture(scope="session")
def tiny_subject(tmp_path_factory) -> dict:
    """{root, clip, speech, ws, preprocessed, times}: the clip, 2 s of speech, the trained
    workspace, its untrained copy, and the seconds each command took."""
    import shutil
    import time

    from talkcli.media.ffmpeg import ffmpeg_exe

    root = tmp_path_factory.mktemp("tiny-subject")
    clip, speech = root / "clip.mp4", root / "speech.wav"
    for src, dst, seconds in ((CLIP, clip, "3"), (WAV_16K, speech, "2")):
        subprocess.run([ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", "-i", str(src), "-t", seconds,
                        *(["-c", "copy"] if dst.suffix == ".mp4" else []), str(dst)], check=True, timeout=120)
    ws, times = root / "ws", {}
    for name, args in (("preprocess", ("preprocess", clip, "-w", ws, "--size", "64")),
                       ("train", ("train", ws, *TINY_TRAIN))):
        t0 = time.time()
        talk("--quiet", *args, check=True, timeout=600)
        times[name] = time.time() - t0
        if name == "preprocess":
            shutil.copytree(ws, root / "preprocessed")
    return {"root": root, "clip": clip, "speech": speech, "ws": ws, "preprocessed": root / "preprocessed",
            "times": times}

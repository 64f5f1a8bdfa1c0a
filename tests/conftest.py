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

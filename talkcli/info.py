"""What ``talk info`` reports: versions, compute device, native kernels, optional models."""

from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

from . import __version__
from .media.ffmpeg import ffmpeg_exe, ffmpeg_version
from .models import OPTIONAL_MODELS, check, models_root
from .ops._native import status as native_status

PACKAGES = ("torch", "numpy", "mediapipe", "opencv-contrib-python", "librosa", "pocketsphinx", "av", "typer", "rich",
            "imageio-ffmpeg", "tinycudann")


def _pkg(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def collect() -> dict:
    import torch

    cuda = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        cuda = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return {
        "talkcli": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(terse=True),
        "packages": {k: v for k in PACKAGES if (v := _pkg(k))},
        "ffmpeg": {"path": ffmpeg_exe(), "version": ffmpeg_version()},
        "device": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": cuda,
        },
        "native_kernels": native_status(),
        "models_root": str(models_root()),
        "optional_models": {
            m.name: {"configured": ok, "detail": detail, "purpose": m.purpose, "env": m.env}
            for m in OPTIONAL_MODELS
            for ok, detail in [check(m)]
        },
    }

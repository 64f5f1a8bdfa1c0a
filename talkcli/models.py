"""Optional model files: where talkcli looks for them and what to say when they are missing.

Nothing is downloaded at run time. Each optional model is a set of files the user puts in
``$TALKCLI_MODELS/<name>/`` (default ``~/.cache/talkcli/models/<name>/``) or points to with the
model's own environment variable or command-line option. The default path of every command works
without any of them (the built-in face model and log-mel audio features).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .errors import MissingModel


@dataclasses.dataclass(frozen=True)
class OptionalModel:
    name: str
    purpose: str
    files: tuple[str, ...]  # glob patterns that must each match a file in the model directory
    env: str
    source: str  # where the user gets it (the files need registration or a licence acceptance)


OPTIONAL_MODELS = (
    OptionalModel("flame", "FLAME face model instead of the built-in one (--flame)",
                  ("generic_model.pkl", "mediapipe_landmark_embedding.npz"), "TALKCLI_FLAME",
                  "https://flame.is.tue.mpg.de (registration) and the FLAME mediapipe embedding"),
    OptionalModel("face_alignment", "face-alignment 2D landmark backend (--landmarks face-alignment)",
                  ("2DFAN4*.zip",), "TALKCLI_FACE_ALIGNMENT",
                  "the 2D FAN checkpoint face-alignment downloads to ~/.cache/torch/hub/checkpoints"),
    OptionalModel("hubert", "HuBERT audio features (--audio-features hubert)",
                  ("config.json", "*.bin|*.safetensors"), "TALKCLI_HUBERT",
                  "a Hugging Face transformers HuBERT checkpoint directory"),
    OptionalModel("wav2vec2", "wav2vec2 audio features (--audio-features wav2vec2)",
                  ("config.json", "*.bin|*.safetensors"), "TALKCLI_WAV2VEC2",
                  "a Hugging Face transformers wav2vec2 checkpoint directory"),
    OptionalModel("lpips", "LPIPS perceptual loss and metric",
                  ("alex.pth", "alexnet-*.pth"), "TALKCLI_LPIPS",
                  "lpips' alex.pth linear layers and torchvision's AlexNet weights"),
)


def models_root() -> Path:
    return Path(os.environ.get("TALKCLI_MODELS", Path.home() / ".cache" / "talkcli" / "models"))


def model_dir(model: OptionalModel) -> Path:
    return Path(os.environ[model.env]) if os.environ.get(model.env) else models_root() / model.name


def _matches(directory: Path, pattern: str) -> list[Path]:
    found: list[Path] = []
    for alt in pattern.split("|"):
        found.extend(p for p in directory.glob(alt) if p.is_file())
    return found


def check(model: OptionalModel) -> tuple[bool, str]:
    """(configured, description) for ``talk info``."""
    directory = model_dir(model)
    if not directory.is_dir():
        return False, f"not configured: put {', '.join(model.files)} in {directory}"
    missing = [pat for pat in model.files if not _matches(directory, pat)]
    if missing:
        return False, f"incomplete: {directory} lacks {', '.join(missing)}"
    return True, str(directory)


def require(name: str) -> Path:
    """The model's directory, or a MissingModel error that names the file and where it goes."""
    model = next(m for m in OPTIONAL_MODELS if m.name == name)
    directory = model_dir(model)
    missing = [pat for pat in model.files if not (directory.is_dir() and _matches(directory, pat))]
    if missing:
        raise MissingModel(
            f"{model.purpose} needs {', '.join(missing)} in {directory} (from {model.source}); "
            f"or set {model.env} to the directory that holds it"
        )
    return directory

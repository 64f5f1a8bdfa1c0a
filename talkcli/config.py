"""Typed configuration. One place of defaults; CLI flags override fields.

Each stage declares which fields matter to it (``*_fields`` below): only those go into the
stage's record and key, so changing the output size redoes the frames but not face detection.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .errors import NotAvailable, UsageError

AUDIO_FEATURE_KINDS = ("logmel", "hubert", "wav2vec2")
FRAME_FORMATS = ("png", "jpg")


@dataclass(frozen=True)
class PreprocessConfig:
    fps: float = 25.0  # working frame rate: every stage downstream sees this constant rate
    size: int = 512  # output frames are size x size
    frame_format: str = "png"  # png is lossless (training targets); jpg is ~6x smaller on disk
    jpeg_quality: int = 95
    crop: str = "auto"  # auto (face-centred), full (largest centred square), or "x,y,side"
    crop_scale: float = 2.6  # crop side in face-box heights: head, hair, neck and shoulders
    crop_shift: float = 0.25  # crop centre below the face centre, in face-box heights
    detect_max_side: int = 640  # frames are downscaled to this for face detection
    min_face_fraction: float = 0.5  # fewer frames with a face than this is an error
    sample_rate: int = 16000
    audio_features: str = "logmel"
    audio_model: str | None = None  # path to a HuBERT / wav2vec2 model (later versions)
    mel_bins: int = 80
    mel_per_frame: int = 4  # feature frames per video frame (10 ms hop at 25 fps)
    mel_window_s: float = 0.025
    mel_fmin: float = 55.0
    mel_fmax: float = 7600.0
    landmarks: str = "mediapipe"  # who gives the iBUG 68 points: mediapipe, or face-alignment (FAN)
    landmarks_model: str | None = None  # FAN checkpoint (2DFAN4-*.zip) or the directory holding it
    face_model: str = "builtin"  # builtin, or flame when --flame is given
    flame: str | None = None  # FLAME generic_model.pkl
    flame_embedding: str | None = None  # mediapipe_landmark_embedding.npz (default: beside the pkl)
    expression_components: int = 32  # at most this many expression components (built-in model)
    expression_explained: float = 0.97  # fewest components that explain this much variance
    pose_smoothing: float = 1.0  # Gaussian sigma in frames for head pose (0: none)

    def validate(self) -> "PreprocessConfig":
        if not 1 <= self.fps <= 240:
            raise UsageError(f"--fps must be between 1 and 240, got {self.fps:g}")
        if not 16 <= self.size <= 4096 or self.size % 2:
            raise UsageError(f"--size must be an even number of pixels between 16 and 4096, got {self.size}")
        if self.frame_format not in FRAME_FORMATS:
            raise UsageError(f"--frame-format must be one of {', '.join(FRAME_FORMATS)}")
        if self.audio_features not in AUDIO_FEATURE_KINDS:
            raise UsageError(f"--audio-features must be one of {', '.join(AUDIO_FEATURE_KINDS)}")
        if self.audio_features != "logmel":  # fail before any work, not after the frames stage
            raise NotAvailable(f"--audio-features {self.audio_features} is not available in this version yet; "
                               "use logmel (the default)")
        if not 0.0 <= self.min_face_fraction <= 1.0:
            raise UsageError("--min-face-fraction must be between 0 and 1")
        if self.crop not in ("auto", "full"):
            parse_crop(self.crop)
        if self.landmarks not in ("mediapipe", "face-alignment"):
            raise UsageError("--landmarks must be mediapipe or face-alignment")
        if self.face_model not in ("builtin", "flame"):
            raise UsageError("--face-model must be builtin or flame")
        if self.face_model == "flame":
            self._check_flame_files()
        if not 1 <= self.expression_components <= 128:
            raise UsageError("--expression-components must be between 1 and 128")
        if self.audio_model is not None and not Path(self.audio_model).exists():
            raise UsageError(f"--audio-model {self.audio_model}: no such file or directory")
        return self

    def flame_files(self) -> tuple[Path, Path]:
        """The FLAME model and its mediapipe embedding (by default beside the model)."""
        pkl = Path(self.flame or "")
        emb = Path(self.flame_embedding) if self.flame_embedding else pkl.with_name("mediapipe_landmark_embedding.npz")
        return pkl, emb

    def _check_flame_files(self) -> None:
        """Fail before any work when the FLAME files are not where they were said to be."""
        from .errors import MissingModel

        if not self.flame:
            raise UsageError("the FLAME face model needs --flame PATH/generic_model.pkl")
        pkl, emb = self.flame_files()
        for path, what in ((pkl, "the FLAME model (generic_model.pkl, from https://flame.is.tue.mpg.de)"),
                           (emb, "FLAME's mediapipe landmark embedding (mediapipe_landmark_embedding.npz)")):
            if not path.is_file():
                raise MissingModel(f"{path} not found: put {what} there, or pass its path "
                                   f"({'--flame' if path == pkl else '--flame-embedding'})")

    def fields(self, *names: str) -> dict:
        return {n: getattr(self, n) for n in names}

    def replace(self, **changes) -> "PreprocessConfig":
        return dataclasses.replace(self, **changes)


# What each stage's output depends on (besides its upstream stages).
PROBE_FIELDS = ("fps",)
DETECT_FIELDS = ("crop", "crop_scale", "crop_shift", "detect_max_side", "min_face_fraction")
FRAMES_FIELDS = ("size", "frame_format", "jpeg_quality")
AUDIO_FIELDS = ("sample_rate",)
LANDMARK_FIELDS = ("landmarks", "landmarks_model")
MATTING_FIELDS: tuple[str, ...] = ()
FACEFIT_FIELDS = ("face_model", "flame", "flame_embedding", "expression_components", "expression_explained",
                  "pose_smoothing")
FEATURE_FIELDS = ("audio_features", "audio_model", "mel_bins", "mel_per_frame", "mel_window_s", "mel_fmin",
                  "mel_fmax")


def parse_crop(text: str) -> tuple[int, int, int]:
    """``"x,y,side"`` in source pixels -> ints, with a usage error that shows the format."""
    try:
        x, y, side = (int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--crop must be auto, full or x,y,side in source pixels (e.g. 100,40,512), got {text!r}")
    if side <= 0 or x < 0 or y < 0:
        raise UsageError(f"--crop {text}: x and y must be >= 0 and side > 0")
    return x, y, side

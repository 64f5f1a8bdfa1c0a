"""Typed avatar configs; ``presets/*.toml`` load into them and ``--set section.field=value`` overrides.

A preset has two sections: ``[model]`` (what the network is: changing it needs a fresh training)
and ``[train]`` (how it is trained: iterations, rays, learning rates, logging).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass(frozen=True)
class TorsoModel:
    """The RAD-NeRF-style 2D torso both avatars use: deformation by head pose + 2D hash grid."""

    torso_levels: int = 12
    torso_features: int = 2
    torso_log2_table: int = 16
    torso_hidden: int = 64


@dataclass(frozen=True)
class R2TalkerModel(TorsoModel):
    """R2-Talker's networks (paper Table 6 in the r2talker-paper preset)."""

    # landmark encoder: 68 pose-normalised 3D landmarks of `window` frames -> hash grid -> FCs
    window: int = 5
    lmk_levels: int = 16
    lmk_features: int = 2
    lmk_log2_table: int = 16
    lmk_base: float = 32.0
    lmk_finest: float = 2048.0
    cond_hidden: int = 128
    cond_layers: int = 3          # FCs from the concatenated encodings to h_cond
    cond_dim: int = 128
    # head field: position hash grid + sigma net + colour net, M-AGLO at every hidden layer
    pos_levels: int = 16
    pos_features: int = 4
    pos_log2_table: int = 16
    pos_base: float = 32.0
    pos_finest: float = 2048.0
    sigma_layers: int = 3
    sigma_hidden: int = 128
    geo_dim: int = 128            # sigma net output: 1 density + geo_dim features
    color_layers: int = 2
    color_hidden: int = 64
    conditioning: str = "maglo"   # maglo | concat (the GLO baseline of the ablation)
    encoder: str = "hashgrid"     # hashgrid | flat (raw landmark coordinates: ablation baseline)
    # progressive hash levels (Conditional Progressive Optimization)
    progressive: bool = True
    start_levels: int = 4
    # geometry / sampling
    occupancy_resolution: int = 128
    steps_per_ray: int = 128      # lattice steps across the box diagonal
    max_samples: int = 96


@dataclass(frozen=True)
class TrainConfig:
    size: int = 512               # training resolution (frames are resized to size x size)
    iterations: int = 240_000     # head iterations (lips fine-tuning included)
    torso_iterations: int = 40_000
    rays: int = 4096              # rays per iteration
    frames_per_batch: int = 4     # rays come from this many frames per iteration
    head_ray_fraction: float = 0.5  # share of rays drawn inside the head box (oversampling)
    mouth_ray_fraction: float = 0.0  # share drawn in the lip patch around the mouth (articulation)
    lr: float = 1e-2              # hash tables
    lr_net: float = 1e-3          # MLPs
    weight_decay: float = 1e-6
    lr_drops: tuple[float, ...] = (0.625, 0.75)   # x0.1 then x0.01 at these fractions (150K, 180K of 240K)
    lips_start: float = 0.833     # lips fine-tuning from this fraction (200K of 240K), lr reset
    lips_patch: int = 32          # patch side in pixels at the training size
    lpips_weight: float = 0.01
    lip_substitute: str = "ssim"  # without LPIPS weights: (1 - SSIM) on the lip patch
    progressive_every: int = 5000  # iterations per extra hash level at 240K (scaled to `iterations`)
    occupancy_every: int = 16
    occupancy_warmup: int = 256   # iterations before the grid starts pruning
    holdout_fraction: float = 0.1  # the last frames, never trained on (validation / eval)
    checkpoint_every: int = 2000
    val_every: int = 5000
    log_every: int = 50
    seed: int = 0
    threads: int = 0              # torch threads (0: all cores)


@dataclass(frozen=True)
class MeshHashModel(TorsoModel):
    """The mesh-anchored hash-table blendshape avatar (MonoAvatar++; meshhash-paper holds the
    paper's values: Tab. A, supplementary C and D)."""

    # anchor mesh: the built-in face mesh (one midpoint subdivision) + a rigid head proxy shell
    subdivide: bool = True
    head_proxy: bool = True
    proxy_spacing: float = 0.02   # metres between proxy points on the head shell
    max_distance: float = 0.03    # metres: samples farther than this from every anchor are empty
    # per-vertex hash-table blendshapes (Tab. A)
    n_blend: int = 5              # M tables per vertex: 4 predicted weights + 1 constant
    hash_levels: int = 2
    hash_features: int = 4
    hash_log2_table: int = 8
    hash_base: float = 32.0
    hash_finest: float = 64.0
    # UV-space U-Net on the vertex-displacement map (C.1)
    uv_size: int = 128
    unet_encoder: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    unet_decoder: tuple[int, ...] = (128, 64, 64, 64, 64, 64)
    feature_dim: int = 24
    # k nearest anchors (Sec. 3.4)
    knn: str = "grid"             # grid (hierarchical, 64^3 cells with K' candidates) | brute
    knn_k: int = 3
    knn_candidates: int = 12
    knn_resolution: int = 64
    # tiny MLP (C.2)
    mlp_hidden: int = 64
    mlp_layers: int = 2
    pos_bands: int = 8
    dir_bands: int = 4
    # error-correcting warp field, training only (B, C.3)
    warp: bool = True
    warp_latent: int = 32
    warp_bands: int = 6
    warp_depth: int = 5
    warp_width: int = 128
    warp_branch_depth: int = 2
    # geometry / sampling
    occupancy_resolution: int = 128
    steps_per_ray: int = 128
    max_samples: int = 96


@dataclass(frozen=True)
class MeshHashTrain:
    """How the mesh-anchored avatar trains (supplementary D; fractions are of ``iterations``)."""

    size: int = 512
    iterations: int = 400_000
    torso_iterations: int = 40_000
    rays: int = 2048              # 256 rays from each of 8 frames
    frames_per_batch: int = 8
    head_ray_fraction: float = 0.5
    sampling: str = "occupancy"   # occupancy (grid marching) | hierarchical (32 coarse + 32 fine)
    coarse_samples: int = 32
    fine_samples: int = 32
    lr: float = 5e-4              # networks
    lr_tables: float = 5e-4       # hash tables (the paper: one rate for everything but the warp)
    lr_warp: float = 1e-4
    lr_final_factor: float = 0.1  # exponential decay to this factor at the end (5e-4 -> 5e-5)
    weight_decay: float = 0.0
    warp_start: float = 0.0125    # warp field enabled after 5k of 400k iterations
    warp_ramp: float = 0.2        # its PE bands open 0 -> warp_bands over the first 20%
    elastic_weight: float = 1e-4
    elastic_weight_late: float = 1e-5
    elastic_drop: float = 0.375   # 150k of 400k
    elastic_points: int = 256
    magnitude_weight: float = 1e-2
    l1_until: float = 0.025       # L1 photometric warm start for 10k of 400k, then L2
    occupancy_every: int = 16
    occupancy_warmup: int = 256
    holdout_fraction: float = 0.1
    checkpoint_every: int = 2000
    val_every: int = 5000
    log_every: int = 50
    seed: int = 0
    threads: int = 0


AVATARS = {"r2talker": (R2TalkerModel, TrainConfig), "meshhash": (MeshHashModel, MeshHashTrain)}


@dataclass(frozen=True)
class Preset:
    name: str
    model: R2TalkerModel | MeshHashModel = field(default_factory=R2TalkerModel)
    train: TrainConfig | MeshHashTrain = field(default_factory=TrainConfig)
    avatar: str = "r2talker"

    def to_dict(self) -> dict:
        d = {"name": self.name, "model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train)}
        if self.avatar != "r2talker":  # r2talker records stay as they were: trained avatars stay up to date
            d["avatar"] = self.avatar
        return d

    def validate(self) -> "Preset":
        m, t = self.model, self.train
        if not 16 <= t.size <= 2048:
            raise UsageError(f"train.size must be between 16 and 2048, not {t.size}")
        if not 0.0 <= t.holdout_fraction < 0.5:
            raise UsageError("train.holdout_fraction must be in [0, 0.5)")
        if t.iterations < 1 or t.torso_iterations < 0 or t.rays < 16 or t.frames_per_batch < 1:
            raise UsageError("train.iterations >= 1, train.torso_iterations >= 0, train.rays >= 16 and "
                             "train.frames_per_batch >= 1 are required")
        if self.avatar == "meshhash":
            if m.knn not in ("grid", "brute"):
                raise UsageError(f"model.knn must be grid or brute, not {m.knn!r}")
            if t.sampling not in ("occupancy", "hierarchical"):
                raise UsageError(f"train.sampling must be occupancy or hierarchical, not {t.sampling!r}")
            if m.n_blend < 1 or m.knn_k < 1 or m.knn_candidates < m.knn_k:
                raise UsageError("model.n_blend >= 1 and model.knn_candidates >= model.knn_k >= 1 are required")
            if len(m.unet_encoder) != len(m.unet_decoder) or m.uv_size % (2 ** len(m.unet_encoder)):
                raise UsageError("model.unet_encoder and unet_decoder need the same length, and uv_size must "
                                 "divide by 2^levels")
            return self
        if m.conditioning not in ("maglo", "concat"):
            raise UsageError(f"model.conditioning must be maglo or concat, not {m.conditioning!r}")
        if m.encoder not in ("hashgrid", "flat"):
            raise UsageError(f"model.encoder must be hashgrid or flat, not {m.encoder!r}")
        if m.window < 1 or m.window % 2 == 0:
            raise UsageError(f"model.window must be an odd number of frames, not {m.window}")
        if not 1 <= m.start_levels <= m.pos_levels:
            raise UsageError("model.start_levels must be between 1 and model.pos_levels")
        return self


def presets_dir() -> Path:
    here = Path(__file__).resolve().parent.parent
    for cand in (here / "_presets", here.parent / "presets"):
        if cand.is_dir():
            return cand
    raise UsageError("the presets directory is missing from this installation")


def available_presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.toml"))


def _build(cls, values: dict, where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UsageError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}")
    out = {}
    for k, v in values.items():
        default = getattr(cls(), k)
        out[k] = _coerce(v, default, f"{where}.{k}")
    return cls(**out)


def _coerce(value, default, where: str):
    if isinstance(default, bool):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise UsageError(f"{where} must be true or false, not {value!r}")
    try:
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = json.loads(value if value.startswith("[") else f"[{value}]")
            if default and all(isinstance(v, int) for v in default):
                if any(float(v) != int(float(v)) for v in value):
                    raise ValueError
                return tuple(int(v) for v in value)
            return tuple(float(v) for v in value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{where} must be a {type(default).__name__}, not {value!r}") from None
    return str(value)


def load_preset(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Preset:
    """A preset by name (presets/NAME.toml) or path, with ``section.field=value`` overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = presets_dir() / f"{name_or_path}.toml"
    if not path.is_file():
        raise UsageError(f"no preset {name_or_path!r}; available: {', '.join(available_presets())}")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"preset {path}: {exc}") from None
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UsageError(f"--set {item!r}: write section.field=value, e.g. train.iterations=2000")
        key, value = item.split("=", 1)
        section, fld = key.strip().split(".", 1)
        if section not in ("model", "train"):
            raise UsageError(f"--set {item!r}: the section is model or train")
        data.setdefault(section, {})[fld.strip()] = value.strip()
    extra = sorted(set(data) - {"model", "train", "description", "avatar"})
    if extra:
        raise UsageError(f"preset {path}: unknown section(s) {', '.join(extra)}")
    avatar = str(data.get("avatar", "r2talker"))
    if avatar not in AVATARS:
        raise UsageError(f"preset {path}: avatar must be one of {', '.join(AVATARS)}, not {avatar!r}")
    model_cls, train_cls = AVATARS[avatar]
    return Preset(name=path.stem, model=_build(model_cls, data.get("model", {}), "model"),
                  train=_build(train_cls, data.get("train", {}), "train"), avatar=avatar).validate()


def preset_from_dict(d: dict) -> Preset:
    """The preset stored with a checkpoint."""
    avatar = d.get("avatar", "r2talker")
    model_cls, train_cls = AVATARS[avatar]

    def build(cls, values: dict):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    return Preset(name=d["name"], model=build(model_cls, d["model"]), train=build(train_cls, d["train"]), avatar=avatar)

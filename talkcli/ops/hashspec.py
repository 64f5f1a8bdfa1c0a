"""The multi-resolution hash grid's geometry, as tiny-cuda-nn defines it.

Level l has scale ``s_l = base * b**l - 1`` with ``b = exp(ln(finest / base) / (L - 1))`` and
``ceil(s_l) + 1`` grid points per side. Its table holds ``min(res**D rounded up to 8, 2**T)``
entries: the grid is indexed densely while it fits and hashed otherwise. All levels live in one
flat table of shape ``(sum of level sizes, F)``, level after level (tiny-cuda-nn's layout, so that
parameters copy one to one between backends).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)


@dataclass(frozen=True)
class HashGridSpec:
    dims: int = 3                 # 2 or 3 input dimensions, inputs in [0, 1]
    levels: int = 16              # L
    features: int = 2             # F per level (2 or 4)
    log2_table: int = 19          # T: at most 2**T entries per level
    base_resolution: float = 16.0
    finest_resolution: float = 2048.0

    def __post_init__(self):
        if self.dims not in (2, 3):
            raise ValueError(f"hash grid: dims must be 2 or 3, not {self.dims}")
        if self.features not in (1, 2, 4, 8):
            raise ValueError(f"hash grid: features per level must be 1, 2, 4 or 8, not {self.features}")
        if not 1 <= self.levels <= 32:
            raise ValueError(f"hash grid: levels must be 1..32, not {self.levels}")
        if not 4 <= self.log2_table <= 26:
            raise ValueError(f"hash grid: log2 table size must be 4..26, not {self.log2_table}")
        if not 1 <= self.base_resolution <= self.finest_resolution:
            raise ValueError("hash grid: need 1 <= base resolution <= finest resolution")

    @property
    def output_dim(self) -> int:
        return self.levels * self.features

    @property
    def per_level_scale(self) -> float:
        if self.levels == 1:
            return 1.0
        return math.exp(math.log(self.finest_resolution / self.base_resolution) / (self.levels - 1))

    @cached_property
    def scales(self) -> np.ndarray:
        """float32 scale of each level (computed like tiny-cuda-nn's exp2f(l * log2 b) * base - 1)."""
        log2b = np.float32(math.log2(self.per_level_scale))
        lv = np.arange(self.levels, dtype=np.float32)
        return (np.exp2(lv * log2b) * np.float32(self.base_resolution) - np.float32(1.0)).astype(np.float32)

    @cached_property
    def resolutions(self) -> np.ndarray:
        return (np.ceil(self.scales).astype(np.int64) + 1)

    @cached_property
    def sizes(self) -> np.ndarray:
        """Entries in each level's table."""
        cap = 2 ** self.log2_table
        out = []
        for r in self.resolutions.tolist():
            dense = r ** self.dims
            n = cap if dense > cap else dense
            n = min((n + 7) // 8 * 8, cap)
            out.append(n)
        return np.array(out, dtype=np.int64)

    @cached_property
    def hashed(self) -> np.ndarray:
        """Whether each level is hashed (its dense grid does not fit its table)."""
        return np.array([r ** self.dims > s for r, s in zip(self.resolutions.tolist(), self.sizes.tolist())])

    @cached_property
    def offsets(self) -> np.ndarray:
        """Row of each level's first entry in the flat table; offsets[-1] is the total."""
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    @property
    def n_entries(self) -> int:
        return int(self.offsets[-1])

    def level_tensors(self, device) -> dict[str, torch.Tensor]:
        """What the kernels take: per-level scale (f32), resolution, size, offset, hashed (i32/i64)."""
        return {
            "scales": torch.from_numpy(self.scales.copy()).to(device),
            "resolutions": torch.from_numpy(self.resolutions.astype(np.int32)).to(device),
            "sizes": torch.from_numpy(self.sizes.astype(np.int32)).to(device),
            "offsets": torch.from_numpy(self.offsets.astype(np.int64)).to(device),
            "hashed": torch.from_numpy(self.hashed.astype(np.uint8)).to(device),
        }


def grid_index(corner: torch.Tensor, resolution: int, size: int, hashed: bool) -> torch.Tensor:
    """Table row of integer grid points ``corner`` (..., D) int64 on one level (reference math).

    Dense: row-major with x fastest; hashed: xor of coordinate x prime in uint32 arithmetic.
    Both taken modulo the level's table size, as in the kernels (kernels/common.h).
    """
    dims = corner.shape[-1]
    c = corner & 0xFFFFFFFF
    if not hashed:
        idx = torch.zeros_like(c[..., 0])
        stride = 1
        for d in range(dims):
            idx = (idx + c[..., d] * stride) & 0xFFFFFFFF
            stride = (stride * resolution) & 0xFFFFFFFF
        return idx % size
    h = torch.zeros_like(c[..., 0])
    for d in range(dims):
        h = h ^ ((c[..., d] * PRIMES[d]) & 0xFFFFFFFF)
    return h % size


def pos_fract(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell corner (int64) and fraction of ``x`` on a level: fma(scale, x, 0.5) rounded once to
    float32 like the kernels, then split. Works in float32 and float64 (gradcheck)."""
    if x.dtype == torch.float32:
        pos = (x.double() * float(scale) + 0.5).float()
    else:
        pos = x * float(scale) + 0.5
    cell = torch.floor(pos)
    return cell.long(), pos - cell

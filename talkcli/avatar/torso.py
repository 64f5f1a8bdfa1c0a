"""RAD-NeRF-style torso: a 2D field over the image plane, deformed by the head pose.

The torso barely has depth and moves with the head and shoulders, so RAD-NeRF models it in 2D:
an MLP turns (pixel position, head pose) into a small offset of the pixel position, a 2D hash grid
is read at the offset position, and a second MLP gives colour and alpha. The composite is
``head + (1 - head opacity) * (torso_rgb * a + (1 - a) * background)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..ops.hashgrid import HashGrid, HashGridSpec
from .config import TorsoModel

POSE_DIM = 12  # rotation (9) and translation (3, in decimetres) relative to the clip's mean pose


def pose_vector(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """(N, 12) float32 pose codes of head -> camera poses."""
    return np.concatenate([rotation.reshape(-1, 9), translation.reshape(-1, 3) * 10.0], axis=1).astype(np.float32)


def positional(x: torch.Tensor, bands: int) -> torch.Tensor:
    freq = 2.0 ** torch.arange(bands, dtype=x.dtype, device=x.device) * torch.pi
    ang = x[..., None] * freq
    return torch.cat([x, ang.sin().flatten(-2), ang.cos().flatten(-2)], dim=-1)


class Torso(nn.Module):
    def __init__(self, m: TorsoModel, pose_mean: np.ndarray):
        super().__init__()
        self.register_buffer("pose_mean", torch.as_tensor(pose_mean, dtype=torch.float32).reshape(POSE_DIM))
        h = m.torso_hidden
        self.deform = nn.Sequential(nn.Linear(2 + 2 * 2 * 4 + POSE_DIM, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                    nn.Linear(h, 2))
        nn.init.zeros_(self.deform[-1].weight)
        nn.init.zeros_(self.deform[-1].bias)
        self.grid = HashGrid(HashGridSpec(dims=2, levels=m.torso_levels, features=m.torso_features,
                                          log2_table=m.torso_log2_table, base_resolution=16.0,
                                          finest_resolution=2048.0 if m.torso_levels >= 16 else 512.0))
        self.color = nn.Sequential(nn.Linear(self.grid.output_dim + POSE_DIM, h), nn.ReLU(), nn.Linear(h, h),
                                   nn.ReLU(), nn.Linear(h, 4))

    def forward(self, uv: torch.Tensor, pose: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``uv`` (R, 2) pixel positions in [0, 1], ``pose`` (R, 12) -> rgb (R, 3), alpha (R,)."""
        p = pose - self.pose_mean
        offset = torch.tanh(self.deform(torch.cat([positional(uv, 4), p], dim=-1))) * 0.25
        enc = self.grid((uv + offset).clamp(0.0, 1.0))
        out = self.color(torch.cat([enc, p], dim=-1))
        return torch.sigmoid(out[:, :3]), torch.sigmoid(out[:, 3])

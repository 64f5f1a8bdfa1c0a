"""R2-Talker (../shared/papers/r2talker.txt): landmark hash-grid encoder + M-AGLO head NeRF.

    landmarks (B, window, 68, 3) --hash grid--> (B, window*68*L*F) --FCs--> h_cond (B, C)
    sample x (S, 3) --hash grid (progressive levels)--> sigma net  --(1 + geo)--> colour net --> rgb
                                           each hidden layer: I = I_hat * (1 + beta) + alpha,
                                           (alpha, beta) = FC(h_cond of the sample's frame)

The torso (``torso.Torso``) and the occupancy grid live beside the head in ``R2Talker``; the
renderer (``render``) marches rays through the grid and composites head over torso over the
background plate.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..ops.hashgrid import HashGrid, HashGridSpec
from ..ops.raymarch import OccupancyGrid, OccupancySpec
from .config import R2TalkerModel
from .fields import ConditionedMLP
from .torso import Torso

N_LANDMARKS = 68


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class LandmarkEncoder(nn.Module):
    """Structure-aware landmark encoding (Sec. 3.2): each landmark looked up in one 3D hash grid,
    the encodings of all landmarks of the window concatenated and mapped by FCs to h_cond.
    ``encoder="flat"`` feeds the raw coordinates to the FCs instead (the ablation's baseline)."""

    def __init__(self, m: R2TalkerModel):
        super().__init__()
        self.kind = m.encoder
        if m.encoder == "hashgrid":
            self.grid = HashGrid(HashGridSpec(dims=3, levels=m.lmk_levels, features=m.lmk_features,
                                              log2_table=m.lmk_log2_table, base_resolution=m.lmk_base,
                                              finest_resolution=m.lmk_finest))
            per_point = self.grid.output_dim
        else:
            per_point = 3
        self.fcs = _mlp([m.window * N_LANDMARKS * per_point] + [m.cond_hidden] * (m.cond_layers - 1) + [m.cond_dim])

    def forward(self, lmk01: torch.Tensor) -> torch.Tensor:
        """``lmk01`` (B, window, 68, 3) landmarks mapped into [0, 1]^3 -> h_cond (B, cond_dim)."""
        b = lmk01.shape[0]
        if self.kind == "hashgrid":
            enc = self.grid(lmk01.reshape(-1, 3)).reshape(b, -1)
        else:
            enc = (lmk01.reshape(b, -1) - 0.5) * 2
        return self.fcs(enc)


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    """exp with its argument clamped (Instant-NGP's density activation without overflow)."""
    return torch.exp(x.clamp(max=15.0))


class HeadField(nn.Module):
    """Density and colour of head samples given per-frame conditions."""

    def __init__(self, m: R2TalkerModel, aabb: tuple[float, ...]):
        super().__init__()
        self.grid = HashGrid(HashGridSpec(dims=3, levels=m.pos_levels, features=m.pos_features,
                                          log2_table=m.pos_log2_table, base_resolution=m.pos_base,
                                          finest_resolution=m.pos_finest))
        self.register_buffer("aabb_min", torch.tensor(aabb[:3], dtype=torch.float32))
        self.register_buffer("aabb_size", torch.tensor(aabb[3:], dtype=torch.float32) - self.aabb_min)
        self.geo_dim = m.geo_dim
        self.sigma_net = ConditionedMLP(self.grid.output_dim, m.sigma_hidden, m.sigma_layers - 1, 1 + m.geo_dim,
                                        m.cond_dim, m.conditioning)
        with torch.no_grad():  # start as a thin haze (opacity ~5% per step), not an opaque fog
            self.sigma_net.out.bias[0] = -3.0
        self.color_net = ConditionedMLP(m.geo_dim + 3, m.color_hidden, m.color_layers - 1, 3, m.cond_dim,
                                        m.conditioning)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.aabb_min) / self.aabb_size).clamp(0.0, 1.0)

    def density(self, x: torch.Tensor, cond: torch.Tensor, index: torch.Tensor | None,
                level_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.sigma_net(self.grid(self.normalise(x), level_mask), cond, index)
        return trunc_exp(h[:, 0]), h[:, 1:]

    def forward(self, x: torch.Tensor, d: torch.Tensor, cond: torch.Tensor, index: torch.Tensor | None,
                level_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        sigma, geo = self.density(x, cond, index, level_mask)
        rgb = torch.sigmoid(self.color_net(torch.cat([geo, d], dim=-1), cond, index))
        return sigma, rgb


class R2Talker(nn.Module):
    """The whole avatar of one subject: landmark encoder, head field, torso, occupancy grid, and
    the normalisation constants learned from its workspace (kept in the state dict)."""

    def __init__(self, m: R2TalkerModel, aabb: tuple[float, ...], lmk_box: tuple[np.ndarray, np.ndarray],
                 pose_mean: np.ndarray, size: int):
        super().__init__()
        self.cfg = m
        self.aabb = tuple(float(v) for v in aabb)
        self.encoder = LandmarkEncoder(m)
        self.head = HeadField(m, self.aabb)
        self.torso = Torso(m, pose_mean)
        self.occupancy = OccupancyGrid(OccupancySpec(resolution=m.occupancy_resolution, aabb=self.aabb))
        self.register_buffer("lmk_lo", torch.as_tensor(lmk_box[0], dtype=torch.float32))
        self.register_buffer("lmk_hi", torch.as_tensor(lmk_box[1], dtype=torch.float32))
        self.register_buffer("active_levels", torch.tensor(m.pos_levels, dtype=torch.int64))
        self.size = size
        diag = float(np.linalg.norm(np.subtract(self.aabb[3:], self.aabb[:3])))
        self.step_size = diag / m.steps_per_ray

    kind = "r2talker"

    def frame_input(self, landmarks: np.ndarray, mesh: np.ndarray | None, t: int) -> np.ndarray:
        """What ``condition`` takes for frame t of a track: the landmark window around it."""
        from .data import windows

        return landmarks[windows(len(landmarks), np.array([t]), self.cfg.window)[0]]

    def condition(self, landmarks: torch.Tensor) -> torch.Tensor:
        """h_cond (B, C) of landmark windows (B, window, 68, 3) in metres (head frame)."""
        lmk01 = ((landmarks - self.lmk_lo) / (self.lmk_hi - self.lmk_lo)).clamp(0.0, 1.0)
        return self.encoder(lmk01)

    def level_mask(self) -> torch.Tensor | None:
        n = self.cfg.pos_levels
        active = int(self.active_levels)
        if active >= n:
            return None
        return torch.arange(n) < active

    def set_progress(self, iteration: int, total: int, every: int) -> None:
        """Conditional progressive optimisation: ``start_levels`` hash levels at first, one more
        every ``every`` iterations of a 240K run, scaled to ``total``."""
        m = self.cfg
        if not m.progressive:
            self.active_levels.fill_(m.pos_levels)
            return
        step = max(1, round(every * total / 240_000))
        self.active_levels.fill_(min(m.pos_levels, m.start_levels + iteration // step))

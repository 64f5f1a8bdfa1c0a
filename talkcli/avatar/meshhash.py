"""Mesh-anchored hash-table blendshapes (MonoAvatar++, ../shared/papers/mesh-anchored-hash-blendshapes.txt).

    tracked mesh (B, 478, 3) --minus neutral, rasterised to UV--> displacement map (B, 3, 128, 128)
      --U-Net--> blend weights (B, M, 128, 128) and features (B, 24, 128, 128), sampled at anchor UVs
    anchors (B, V, 3) + tangent frames  (face: subdivided mesh; head proxy: rigid shell)
    sample q --k-NN (hierarchical grid)--> K anchors --q in each anchor's frame--> M small hash grids
      --blend by the weights (Eq. 1)--> h_k --inverse-distance blend (Eq. 2)--> h
      [h, f of the nearest anchor, PE(q_local)] --2 x 64 MLP--> sigma; [last hidden, PE(d)] --> rgb

Training adds the error-correcting warp field (per-frame rigid warp of q, supplementary B).

The avatar exposes what the R2-Talker renderer uses (``aabb``, ``occupancy``, ``step_size``,
``cfg.max_samples``, ``torso``, ``condition``, ``head(x, d, cond, index, mask)``,
``head.density``), so ray marching, compositing, the torso and the background are shared.
Densities do not depend on the view direction (it enters only the colour layer), so one
occupancy grid serves every view.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..ops.hashgrid_batched import BatchedHashGrids, batched_hash_encode
from ..ops.hashspec import HashGridSpec
from ..ops.knn import KnnGridSpec, build_knn_grid, knn_brute, knn_query
from ..ops.raymarch import OccupancyGrid, OccupancySpec
from .anchors import AnchorLayout, Anchors, face_uv, to_local
from .config import MeshHashModel
from .r2talker import trunc_exp
from .torso import Torso, positional
from .uvnet import UVRasterizer, UVUNet, sample_at_uv
from .warp import WarpField

DISPLACEMENT_UNIT = 0.01  # the U-Net sees displacements in centimetres (values of order 1)


@dataclass
class FrameContext:
    """What a batch of B frames contributes to every sample: anchors, their frames, blend
    weights and features, the k-NN search grids, and (training) the frames' warp codes."""

    anchors: torch.Tensor            # (B, V, 3)
    frames: torch.Tensor             # (B, V, 3, 3)
    weights: torch.Tensor            # (B, V, M)
    features: torch.Tensor           # (B, V, C)
    grids: list | None               # per-frame KnnGrid (None: brute force)
    merged: torch.Tensor | None = None       # (B*V, 1, S, F) Eq. 1's merged tables (rendering)
    frame_ids: torch.Tensor | None = None   # (B,) training frames, for the warp field
    warp_alpha: float | None = None          # PE window of the warp; None: no warp
    warped: list = field(default_factory=list)  # (q, q', frame) of this step's samples, for the warp losses


class MeshHashField(nn.Module):
    def __init__(self, m: MeshHashModel, layout: AnchorLayout, neutral: np.ndarray, uv478: np.ndarray,
                 n_frames: int):
        super().__init__()
        self.cfg = m
        self.anchors = Anchors(layout)
        self.n_face = layout.n_face
        n_proxy = len(layout.proxy)
        self.register_buffer("neutral", torch.as_tensor(neutral, dtype=torch.float32))
        self.register_buffer("uv", torch.from_numpy(face_uv(uv478, layout)), persistent=False)
        self.raster = UVRasterizer(uv478, layout.triangles, m.uv_size)
        self.unet = UVUNet(3, tuple(m.unet_encoder), tuple(m.unet_decoder), m.n_blend - 1, m.feature_dim, m.uv_size)
        # the proxy does not deform: its weights and features are learned constants, not U-Net outputs
        self.proxy_weights = nn.Parameter(torch.zeros(n_proxy, m.n_blend - 1))
        self.proxy_features = nn.Parameter(torch.zeros(n_proxy, m.feature_dim))
        spec = HashGridSpec(dims=3, levels=m.hash_levels, features=m.hash_features, log2_table=m.hash_log2_table,
                            base_resolution=m.hash_base, finest_resolution=m.hash_finest)
        self.tables = BatchedHashGrids(layout.n_anchors, m.n_blend, spec)
        self.knn_spec = KnnGridSpec(resolution=m.knn_resolution, candidates=m.knn_candidates, k=m.knn_k)
        enc = m.hash_levels * m.hash_features
        in_dim = enc + m.feature_dim + 3 * (1 + 2 * m.pos_bands)
        layers: list[nn.Module] = []
        for i in range(m.mlp_layers):
            layers += [nn.Linear(in_dim if i == 0 else m.mlp_hidden, m.mlp_hidden), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.sigma_out = nn.Linear(m.mlp_hidden, 1)
        self.rgb_out = nn.Linear(m.mlp_hidden + 3 * (1 + 2 * m.dir_bands), 3)
        with torch.no_grad():  # start as a thin haze, like the R2-Talker head
            self.sigma_out.bias.fill_(-3.0)
        self.warp = WarpField(n_frames, m.warp_latent, m.warp_bands, m.warp_depth, m.warp_width,
                              m.warp_branch_depth) if m.warp else None

    # ---- per frame

    def context(self, mesh: torch.Tensor, frame_ids: torch.Tensor | None = None,
                warp_alpha: float | None = None) -> FrameContext:
        """Per-frame quantities of meshes (B, 478, 3) (pose-normalised head frame, metres)."""
        b = mesh.shape[0]
        anchors = self.anchors.positions(mesh)
        frames = self.anchors.frames(mesh)
        disp = (mesh - self.neutral) / DISPLACEMENT_UNIT
        wmap, fmap = self.unet(self.raster(disp))
        weights = torch.cat([sample_at_uv(wmap, self.uv),
                             torch.cat([self.proxy_weights, torch.ones(len(self.proxy_weights), 1)], 1).expand(b, -1, -1)], 1)
        features = torch.cat([sample_at_uv(fmap, self.uv), self.proxy_features.expand(b, -1, -1)], 1)
        grids = None
        if self.cfg.knn == "grid":
            grids = [build_knn_grid(anchors[i].detach(), self.knn_spec) for i in range(b)]
        merged = None
        if not torch.is_grad_enabled():
            # rendering: merge each anchor's M tables once per frame (Eq. 1 as the paper writes it),
            # then every sample reads K tables instead of K x M. Training keeps the tables apart:
            # their gradients would otherwise go through B copies of every table.
            t = self.tables.tables
            merged = torch.einsum("bvm,vmsf->bvsf", weights, t).reshape(-1, 1, t.shape[2], t.shape[3])
        use_warp = self.warp is not None and frame_ids is not None and warp_alpha is not None
        return FrameContext(anchors, frames, weights, features, grids, merged, frame_ids if use_warp else None,
                            warp_alpha if use_warp else None)

    # ---- per sample

    def _neighbours(self, x: torch.Tensor, ctx: FrameContext, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, K) anchor indices and squared distances of each sample's nearest anchors in its frame."""
        k = self.cfg.knn_k
        s = x.shape[0]
        idx = torch.empty(s, k, dtype=torch.int64)
        d2 = torch.empty(s, k, dtype=x.dtype)
        xs = x.detach()
        for b in range(ctx.anchors.shape[0]):
            sel = torch.nonzero(index == b).squeeze(1) if ctx.anchors.shape[0] > 1 else None
            pts = xs if sel is None else xs[sel]
            if pts.shape[0] == 0:
                continue
            verts = ctx.anchors[b].detach()
            if ctx.grids is not None:
                i, d = knn_query(pts.contiguous(), verts, ctx.grids[b], k)
            else:
                i, d = knn_brute(pts.contiguous(), verts, k)
            if sel is None:
                idx, d2 = i, d
            else:
                idx[sel], d2[sel] = i, d
        return idx, d2

    def density(self, x: torch.Tensor, ctx: FrameContext, index: torch.Tensor | None,
                level_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """sigma (S,) and the last hidden layer (S, H) of samples ``x`` (S, 3) of frames ``index``."""
        sigma, hid, valid = self._field(x, ctx, index, level_mask)
        return sigma, hid.new_zeros(x.shape[0], hid.shape[1]).index_put((valid,), hid)

    def _field(self, x: torch.Tensor, ctx: FrameContext, index: torch.Tensor | None,
               level_mask=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """sigma (S,), and the last hidden layer (n, H) of the ``valid`` (n,) samples: those within
        ``max_distance`` of an anchor (the others are empty space)."""
        m = self.cfg
        s = x.shape[0]
        if index is None:
            index = torch.zeros(s, dtype=torch.int64)
        if ctx.warp_alpha is not None:
            q, ids = x, ctx.frame_ids[index]
            x = self.warp(x, ids, ctx.warp_alpha)
            ctx.warped.append((q, x, ids))
        idx, d2 = self._neighbours(x, ctx, index)
        sigma = x.new_zeros(s)
        valid = torch.nonzero(d2[:, 0] < m.max_distance ** 2).squeeze(1)
        if valid.numel() == 0:
            return sigma, x.new_zeros(0, m.mlp_hidden), valid
        n_anchor = ctx.anchors.shape[1]
        flat = index[valid, None] * n_anchor + idx[valid]                  # (n, K) rows of (B*V)
        origin = ctx.anchors.reshape(-1, 3)[flat]
        frame = ctx.frames.reshape(-1, 3, 3)[flat]
        local = to_local(x[valid, None, :], origin, frame) / m.max_distance  # (n, K, 3), ~[-1, 1]
        hx = (local * 0.5 + 0.5).clamp(0.0, 1.0).reshape(-1, 3)
        n, k = flat.shape
        z = 1.0 / local.norm(dim=-1).clamp_min(1e-4)
        idw = z / z.sum(1, keepdim=True)                                    # Eq. 2's weights (n, K)
        if ctx.merged is not None:  # one merged table per anchor and frame
            enc = batched_hash_encode(hx, flat.reshape(-1), ctx.merged, self.tables.spec, level_mask)
            h = torch.bmm(idw[:, None, :], enc.reshape(n, k, -1)).squeeze(1)
        else:
            # Eq. 1 (blend each neighbour's M grids by its weights) and Eq. 2 are one weighted
            # sum over the K*M lookups: a batched (1 x KM) @ (KM x LF) product
            enc = self.tables(hx, idx[valid].reshape(-1), level_mask)       # (n*K, M, L*F)
            w = ctx.weights.reshape(-1, ctx.weights.shape[-1])[flat]        # (n, K, M)
            coeff = (w * idw[..., None]).reshape(n, 1, -1)
            h = torch.bmm(coeff, enc.reshape(n, k * m.n_blend, -1)).squeeze(1)
        f = ctx.features.reshape(-1, ctx.features.shape[-1])[flat[:, 0]]
        hid = self.trunk(torch.cat([h, f, positional(local[:, 0], m.pos_bands)], dim=-1))
        sigma = sigma.index_put((valid,), trunc_exp(self.sigma_out(hid)[:, 0]))
        return sigma, hid, valid

    def forward(self, x: torch.Tensor, d: torch.Tensor, ctx: FrameContext, index: torch.Tensor | None,
                level_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        sigma, hid, valid = self._field(x, ctx, index, level_mask)
        rgb = torch.sigmoid(self.rgb_out(torch.cat([hid, positional(d[valid], self.cfg.dir_bands)], dim=-1)))
        return sigma, x.new_zeros(x.shape[0], 3).index_put((valid,), rgb)  # empty space: no colour


class MeshHashAvatar(nn.Module):
    """The whole mesh-anchored avatar of one subject (head field, torso, occupancy grid)."""

    kind = "meshhash"

    def __init__(self, m: MeshHashModel, aabb: tuple[float, ...], layout: AnchorLayout, neutral: np.ndarray,
                 uv478: np.ndarray, pose_mean: np.ndarray, size: int, n_frames: int):
        super().__init__()
        self.cfg = m
        self.aabb = tuple(float(v) for v in aabb)
        self.layout = layout
        self.head = MeshHashField(m, layout, neutral, uv478, n_frames)
        self.torso = Torso(m, pose_mean)
        self.occupancy = OccupancyGrid(OccupancySpec(resolution=m.occupancy_resolution, aabb=self.aabb))
        self.size = size
        diag = float(np.linalg.norm(np.subtract(self.aabb[3:], self.aabb[:3])))
        self.step_size = diag / m.steps_per_ray

    def condition(self, mesh: torch.Tensor, frame_ids: torch.Tensor | None = None,
                  warp_alpha: float | None = None) -> FrameContext:
        return self.head.context(mesh, frame_ids, warp_alpha)

    def level_mask(self) -> None:
        return None

    @property
    def active_levels(self) -> int:
        """Hash levels in use (all: no progressive schedule), for the training log."""
        return self.cfg.hash_levels

    def frame_input(self, landmarks: np.ndarray, mesh: np.ndarray, t: int) -> np.ndarray:
        """What ``condition`` takes for frame t of a track: its mesh (478, 3)."""
        return mesh[t]

    def init_arrays(self, neutral: np.ndarray, uv478: np.ndarray, n_frames: int) -> dict:
        lay = self.layout
        return {"neutral": neutral, "uv478": uv478, "n_frames": n_frames, "triangles": lay.triangles,
                "edges": lay.edges, "neighbour_a": lay.neighbour_a, "neighbour_b": lay.neighbour_b,
                "proxy": lay.proxy, "proxy_normal": lay.proxy_normal}

    @classmethod
    def from_init(cls, m: MeshHashModel, aabb, init: dict, pose_mean: np.ndarray, size: int) -> "MeshHashAvatar":
        layout = AnchorLayout(init["triangles"], init["edges"], init["neighbour_a"], init["neighbour_b"],
                              init["proxy"], init["proxy_normal"])
        return cls(m, aabb, layout, init["neutral"], init["uv478"], pose_mean, size, int(init["n_frames"]))

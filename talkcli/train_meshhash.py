"""``talk train --model meshhash``: the mesh-anchored hash-table blendshape avatar.

The loop, ray batches, torso phase, occupancy grid, checkpoints, logs and validation images are
R2-Talker's (``train.Trainer``); what differs is the model and its head-phase loss
(supplementary D, fractions of the preset's iterations):

- Adam (0.9, 0.999); networks at ``lr``, hash tables at ``lr_tables``, the warp field at
  ``lr_warp``, every rate decaying exponentially to ``lr_final_factor`` at the end;
- photometric L1 for the first ``l1_until``, L2 after;
- the error-correcting warp field from ``warp_start``, its PE window opening 0 -> all bands
  over ``warp_ramp``; elastic loss (``elastic_weight``, ``elastic_weight_late`` after
  ``elastic_drop``) on ``elastic_points`` samples, magnitude loss on all;
- samples from the occupancy grid (``sampling = "occupancy"``) or 32 coarse + 32 fine
  (``"hierarchical"``, the paper's).
"""

from __future__ import annotations

import numpy as np
import torch

from .artifacts import workspace_npz
from .avatar.data import head_aabb
from .avatar.meshhash import MeshHashAvatar
from .avatar.torso import pose_vector
from .avatar.warp import elastic_loss, magnitude_loss
from .train import Trainer


class MeshHashTrainer(Trainer):
    kind = "meshhash"
    betas = (0.9, 0.999)
    fused = True  # 5 tables x 2257 anchors = 23M table entries: the optimiser step dominates otherwise

    def make_model(self) -> MeshHashAvatar:
        from .avatar.anchors import build_layout

        d, m = self.data, self.preset.model
        fit = workspace_npz(self.ws, "facefit.npz")
        if str(fit["model"]) != "builtin" or "triangles" not in fit:
            from .errors import InputError

            raise InputError("meshhash needs the built-in face model's mesh in facefit.npz "
                             "(rerun `talk preprocess` without --flame)")
        aabb = head_aabb(d.landmarks[self.train_idx])
        layout = build_layout(fit["triangles"], d.mesh[self.train_idx], aabb, m.subdivide, m.head_proxy,
                              m.proxy_spacing)
        poses = pose_vector(d.rotation[self.train_idx], d.translation[self.train_idx])
        self._init = (fit["neutral"].astype(np.float32), fit["uv"].astype(np.float32), d.n_frames)
        return MeshHashAvatar(m, aabb, layout, *self._init[:2], poses.mean(axis=0), d.size, d.n_frames)

    def setup(self) -> None:
        self.mesh = torch.from_numpy(self.data.mesh)
        self.mouth_rays = (0.0, 0)  # no lip patch: the mesh moves the mouth's tables

    def model_extra(self) -> dict:
        return {"init": self.model.init_arrays(*self._init)}

    @property
    def table_lr(self) -> float:
        return self.preset.train.lr_tables

    @property
    def net_lr(self) -> float:
        return self.preset.train.lr

    def _head_groups(self) -> list[dict]:
        head = self.model.head
        warp = list(head.warp.parameters()) if head.warp is not None else []
        return self._groups([head.tables.tables], list(head.parameters()), ((warp, self.preset.train.lr_warp),))

    def lr_factor(self, it: int) -> float:
        t = self.preset.train
        if it >= t.iterations:
            frac = (it - t.iterations) / max(1, t.torso_iterations)
        else:
            frac = it / t.iterations
        return t.lr_final_factor ** frac

    def in_lips(self, it: int) -> bool:
        return False

    def _conditions(self, frames: np.ndarray):
        return self.model.condition(self.mesh[torch.from_numpy(np.asarray(frames))])

    def warp_alpha(self, it: int) -> float | None:
        """The warp's PE window at iteration ``it`` (None while the warp is off)."""
        t, m = self.preset.train, self.preset.model
        frac = it / t.iterations
        if not m.warp or frac < t.warp_start:
            return None
        return m.warp_bands * min(1.0, (frac - t.warp_start) / max(t.warp_ramp, 1e-9))

    def head_loss(self, it: int, frames: np.ndarray, batch: tuple, jitter: torch.Tensor, lips: bool):
        t = self.preset.train
        u, v, index, fr, gt, bg = batch
        frac = it / t.iterations
        alpha = self.warp_alpha(it)
        ids = torch.from_numpy(np.asarray(frames))
        cond = self.model.condition(self.mesh[ids], frame_ids=ids, warp_alpha=alpha)
        if t.sampling == "hierarchical":
            from .avatar.render import render_rays_hierarchical

            d = self.data
            res = render_rays_hierarchical(self.model, self.rot[fr], self.tr[fr], u, v, d.focal, d.cx, d.cy, cond,
                                           index, bg, t.coarse_samples, t.fine_samples, self.gen)
        else:
            res = self._render(u, v, index, fr, cond, bg, jitter, torso=False, head_grad=True)
        err = res.rgb - gt
        loss = err.abs().mean() if frac < t.l1_until else (err ** 2).mean()
        if alpha is not None and cond.warped:
            q, warped, sample_frames = (torch.cat(parts) for parts in zip(*cond.warped))
            loss = loss + t.magnitude_weight * magnitude_loss(q, warped)
            if t.elastic_points > 0 and q.shape[0]:
                pick = torch.randint(0, q.shape[0], (min(t.elastic_points, q.shape[0]),), generator=self.gen)
                w = t.elastic_weight if frac < t.elastic_drop else t.elastic_weight_late
                loss = loss + w * elastic_loss(self.model.head.warp, q[pick].detach(), sample_frames[pick], alpha)
        return loss, res

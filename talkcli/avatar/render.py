"""Rays -> samples -> colours: the head through the occupancy grid, the torso on the image plane,
composited over the background plate.

    pixel (u, v), camera (R, t) --pixel_rays--> (o, d) in the head frame --ray_aabb, march_rays-->
    packed samples --HeadField--> (sigma, rgb) --composite--> head rgb, opacity
    final = head + (1 - opacity) * (torso * a + (1 - a) * background)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..ops.composite import composite
from ..ops.raymarch import march_rays, ray_aabb
from .data import pixel_rays
from .r2talker import R2Talker


@dataclass
class Rendered:
    rgb: torch.Tensor            # (R, 3) final colour
    head_rgb: torch.Tensor       # (R, 3) premultiplied head colour
    head_opacity: torch.Tensor   # (R,)
    torso_alpha: torch.Tensor | None
    samples: int


def render_rays(model: R2Talker, rotation: torch.Tensor, translation: torch.Tensor, u: torch.Tensor,
                v: torch.Tensor, focal: float, cx: float, cy: float, cond: torch.Tensor, index: torch.Tensor,
                background: torch.Tensor, pose: torch.Tensor | None = None, size: int | None = None,
                jitter: torch.Tensor | None = None) -> Rendered:
    """Render R pixels. ``rotation`` (R, 3, 3), ``translation`` (R, 3): each ray's camera; ``cond``
    (B, C) frame conditions and ``index`` (R,) the frame of each ray; ``background`` (R, 3);
    ``pose`` (R, 12) enables the torso (``size``: image side for its pixel coordinates)."""
    o, d = pixel_rays(rotation, translation, focal, cx, cy, u, v)
    near, far = ray_aabb(o, d, model.aabb)
    samples = march_rays(o, d, near, far, model.occupancy, model.step_size, model.cfg.max_samples, jitter=jitter)
    sample_index = index[samples.ray_indices]
    sigma, rgb = model.head(samples.positions, samples.directions, cond, sample_index, model.level_mask())
    # densities are per lattice step (delta 1 = one step): the occupancy threshold then reads as
    # "opacity per step" whatever the size of the head box in metres
    head = composite(sigma, rgb, samples.deltas / model.step_size, samples.ts, samples.ray_offsets)
    under = background
    alpha = None
    if pose is not None:
        uv = torch.stack([(u + 0.5) / size, (v + 0.5) / size], dim=-1)
        t_rgb, alpha = model.torso(uv, pose)
        under = t_rgb * alpha[:, None] + (1 - alpha[:, None]) * background
    final = head.rgb + (1 - head.opacity[:, None]) * under
    return Rendered(final, head.rgb, head.opacity, alpha, samples.num_samples)


def render_rays_hierarchical(model, rotation: torch.Tensor, translation: torch.Tensor, u: torch.Tensor,
                             v: torch.Tensor, focal: float, cx: float, cy: float, cond, index: torch.Tensor,
                             background: torch.Tensor, n_coarse: int, n_fine: int,
                             generator: torch.Generator | None = None) -> Rendered:
    """Head rays over the background with NeRF's hierarchical sampling instead of the occupancy
    grid: ``n_coarse`` stratified samples (no gradient) place ``n_fine`` more by importance, and
    the field is trained on all of them (one field serves both passes, as in the paper's
    32 + 32)."""
    from .sampling import importance, stratified

    o, d = pixel_rays(rotation, translation, focal, cx, cy, u, v)
    near, far = ray_aabb(o, d, model.aabb)
    coarse = stratified(o, d, near, far, n_coarse, generator if generator is not None else True)
    with torch.no_grad():
        sigma, rgb = model.head(coarse.positions, coarse.directions, cond, index[coarse.ray_indices], None)
        weights = composite(sigma, rgb, coarse.deltas / model.step_size, coarse.ts, coarse.ray_offsets).weights
    fine = importance(o, d, coarse, weights, n_fine, generator=generator, near=near, far=far)
    sigma, rgb = model.head(fine.positions, fine.directions, cond, index[fine.ray_indices], None)
    head = composite(sigma, rgb, fine.deltas / model.step_size, fine.ts, fine.ray_offsets)
    final = head.rgb + (1 - head.opacity[:, None]) * background
    return Rendered(final, head.rgb, head.opacity, None, fine.num_samples)


@torch.no_grad()
def render_head_terminating(model: R2Talker, o: torch.Tensor, d: torch.Tensor, cond: torch.Tensor,
                            round_samples: int = 12, min_transmittance: float = 1e-3,
                            stats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Head colour (R, 3) and opacity (R,) for rendering, marching in rounds with early termination.

    Training marches every occupied lattice point at once (the gradient needs them all). For a
    picture only the samples in front of the opaque surface matter: each round marches at most
    ``round_samples`` more lattice points of the rays still open, composites them behind what is
    already accumulated, and drops the rays whose transmittance fell below ``min_transmittance``
    or that left the box. Same lattice and grid as ``render_rays``, so the image is the same up to
    the samples that early termination leaves out anyway.
    """
    r = o.shape[0]
    near, far = ray_aabb(o, d, model.aabb)
    rgb = torch.zeros(r, 3)
    trans = torch.ones(r)
    rays = torch.nonzero(far > near).squeeze(1)
    budget = model.cfg.max_samples
    mask = model.level_mask()
    step = model.step_size
    while rays.numel() and budget > 0:
        k = min(round_samples, budget)
        s = march_rays(o[rays], d[rays], near[rays], far[rays], model.occupancy, step, k)
        if s.num_samples == 0:
            break
        sigma, col = model.head(s.positions, s.directions, cond, None, mask)
        if stats is not None:
            stats["samples"] = stats.get("samples", 0) + s.num_samples
        comp = composite(sigma, col, s.deltas / step, s.ts, s.ray_offsets, stop_transmittance=0.0)
        t_before = trans[rays]
        rgb[rays] += t_before[:, None] * comp.rgb
        trans[rays] = t_before * (1 - comp.opacity)
        counts = s.counts()
        last = s.ts[(s.ray_offsets[1:] - 1).clamp_min(0)]
        keep = (counts == k) & (trans[rays] > min_transmittance)
        near[rays] = torch.where(keep, last + s.deltas[(s.ray_offsets[1:] - 1).clamp_min(0)], near[rays])
        rays = rays[keep]
        budget -= k
    return rgb, 1 - trans


@torch.no_grad()
def render_frame(model: R2Talker, rotation: np.ndarray, translation: np.ndarray, landmarks: np.ndarray,
                 background: np.ndarray, focal: float, cx: float, cy: float, torso: bool = True,
                 chunk: int = 1 << 14, stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One whole frame (S, S, 3) float32 in [0, 1] and the head's opacity (S, S).

    ``rotation`` (3, 3), ``translation`` (3,): the head pose; ``landmarks``: what the avatar's
    ``condition`` takes for one frame (``model.frame_input``: R2-Talker's landmark window
    (window, 68, 3), the mesh-anchored avatar's mesh (478, 3)); ``background`` (S, S, 3) float32
    gives the output size; ``focal``, ``cx``, ``cy`` in pixels of that size. ``stats`` counts the
    head samples evaluated.
    """
    from .torso import pose_vector

    size = background.shape[0]
    cond = model.condition(torch.from_numpy(np.ascontiguousarray(landmarks[None], dtype=np.float32)))
    vv, uu = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    u, v = uu.reshape(-1), vv.reshape(-1)
    bg = torch.from_numpy(np.ascontiguousarray(background, dtype=np.float32)).reshape(-1, 3)
    rot = torch.from_numpy(np.asarray(rotation, np.float32))
    tr = torch.from_numpy(np.asarray(translation, np.float32))
    pose = torch.from_numpy(pose_vector(rotation[None], translation[None])[0]) if torso else None
    out = torch.empty(size * size, 3)
    opacity = torch.empty(size * size)
    for s in range(0, size * size, chunk):
        e = min(size * size, s + chunk)
        r = e - s
        o, d = pixel_rays(rot.expand(r, 3, 3), tr.expand(r, 3), focal, cx, cy, u[s:e], v[s:e])
        head_rgb, head_op = render_head_terminating(model, o, d, cond, stats=stats)
        under = bg[s:e]
        if pose is not None:
            uv = torch.stack([(u[s:e] + 0.5) / size, (v[s:e] + 0.5) / size], dim=-1)
            t_rgb, alpha = model.torso(uv, pose.expand(r, -1))
            under = t_rgb * alpha[:, None] + (1 - alpha[:, None]) * under
        out[s:e] = head_rgb + (1 - head_op[:, None]) * under
        opacity[s:e] = head_op
    return out.reshape(size, size, 3).clamp(0, 1).numpy(), opacity.reshape(size, size).numpy()

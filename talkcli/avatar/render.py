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


@torch.no_grad()
def render_frame(model: R2Talker, rotation: np.ndarray, translation: np.ndarray, landmarks: np.ndarray,
                 background: np.ndarray, focal: float, cx: float, cy: float, torso: bool = True,
                 chunk: int = 1 << 14) -> tuple[np.ndarray, np.ndarray]:
    """One whole frame (S, S, 3) float32 in [0, 1] and the head's opacity (S, S).

    ``rotation`` (3, 3), ``translation`` (3,): the head pose; ``landmarks`` (window, 68, 3): the
    condition window; ``background`` (S, S, 3) float32 gives the output size; ``focal``, ``cx``,
    ``cy`` in pixels of that size.
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
        res = render_rays(model, rot.expand(r, 3, 3), tr.expand(r, 3), u[s:e], v[s:e], focal, cx, cy, cond,
                          torch.zeros(r, dtype=torch.long), bg[s:e],
                          None if pose is None else pose.expand(r, -1), size)
        out[s:e] = res.rgb
        opacity[s:e] = res.head_opacity
    return out.reshape(size, size, 3).clamp(0, 1).numpy(), opacity.reshape(size, size).numpy()

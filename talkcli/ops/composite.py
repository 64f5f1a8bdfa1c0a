"""Volume rendering of packed ray samples: front-to-back alpha compositing, forward and backward.

Used by the NeRF-style avatar renderer after ray marching (``raymarch``) and the field
evaluation: the density and colour of every sample are composited into one colour, opacity and
depth per ray, and the training loss flows back to the densities and colours.

Packing (the ``raymarch`` convention): ``R`` rays, ``S`` samples in all; the samples of ray ``r``
are rows ``ray_offsets[r]:ray_offsets[r + 1]`` of every per-sample tensor, ordered front to back
(``ray_offsets`` is ``(R + 1,)`` int64, non-decreasing, from 0 to ``S``; empty rays are allowed).

Per ray, with ``T_0 = 1``::

    alpha_i = 1 - exp(-sigma_i * delta_i)
    w_i     = T_i * alpha_i                  (the sample's weight)
    T_i+1   = T_i * (1 - alpha_i)            (transmittance)

    rgb = sum_i w_i c_i,   opacity = sum_i w_i,   depth = sum_i w_i t_i

Early ray termination: once ``T_i < stop_transmittance`` (1e-4 by default; 0 turns it off) the
sample ``i`` and all later samples of the ray get weight 0 and no gradient.

The result is *not* composited over a background: the caller does
``rgb + (1 - opacity)[:, None] * background``.

Gradients flow to ``sigmas`` and ``rgbs`` only (from the gradients of ``rgb``, ``opacity`` and
``depth``), not to ``deltas`` or ``ts`` (sampling geometry, not learned). ``weights`` is returned
detached, without gradient (for sample pruning and statistics; a loss on it trains nothing).
With ``g_i = g_rgb . c_i + g_opacity + g_depth * t_i``::

    dL/dc_i     = w_i * g_rgb
    dL/dsigma_i = delta_i * (T_i+1 * g_i - sum_{j > i, j active} w_j g_j)

and the suffix sum is ``g_rgb . rgb + g_opacity * opacity + g_depth * depth`` (the forward
outputs) minus the running prefix ``sum_{j <= i} w_j g_j``: one front-to-back pass per ray, with
no division by the transmittance.

``composite`` is the dispatch point: the native kernels (``kernels/cpu/composite.cpp``,
``kernels/cuda/composite.cu``) or ``composite_reference``, the pure-PyTorch spec.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _native

DEFAULT_STOP_TRANSMITTANCE = 1e-4


@dataclass
class Composited:
    """Per-ray results of ``composite``: ``rgb (R, C)``, ``opacity (R,)``, ``depth (R,)`` (the
    weighted sum of the sample distances, not normalised by the opacity) and the per-sample
    ``weights (S,)`` (no gradient)."""

    rgb: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    weights: torch.Tensor


def _check_inputs(sigmas: torch.Tensor, rgbs: torch.Tensor, deltas: torch.Tensor, ts: torch.Tensor,
                  ray_offsets: torch.Tensor, stop_transmittance: float) -> None:
    if sigmas.dim() != 1:
        raise ValueError(f"composite: sigmas must be (S,), got {tuple(sigmas.shape)}")
    n = sigmas.shape[0]
    if rgbs.dim() != 2 or rgbs.shape[0] != n or rgbs.shape[1] < 1:
        raise ValueError(f"composite: rgbs must be (S={n}, C>=1), got {tuple(rgbs.shape)}")
    for name, t in (("deltas", deltas), ("ts", ts)):
        if t.shape != (n,):
            raise ValueError(f"composite: {name} must be (S={n},), got {tuple(t.shape)}")
    if not sigmas.is_floating_point() or any(t.dtype != sigmas.dtype for t in (rgbs, deltas, ts)):
        raise ValueError("composite: sigmas, rgbs, deltas and ts must share one floating dtype")
    if ray_offsets.dim() != 1 or ray_offsets.numel() < 1 or ray_offsets.dtype != torch.int64:
        raise ValueError(f"composite: ray_offsets must be (R+1,) int64, got {tuple(ray_offsets.shape)} "
                         f"{ray_offsets.dtype}")
    if not stop_transmittance >= 0.0:
        raise ValueError(f"composite: stop_transmittance must be >= 0, not {stop_transmittance}")


def ray_indices_from_offsets(offsets: torch.Tensor, n_samples: int) -> torch.Tensor:
    """The ray of every packed sample, ``(S,)`` int64, from ``offsets (R+1,)``."""
    counts = offsets[1:] - offsets[:-1]
    rays = torch.arange(counts.numel(), device=offsets.device)
    return torch.repeat_interleave(rays, counts, output_size=n_samples)


def composite_reference(sigmas: torch.Tensor, rgbs: torch.Tensor, deltas: torch.Tensor, ts: torch.Tensor,
                        ray_offsets: torch.Tensor,
                        stop_transmittance: float = DEFAULT_STOP_TRANSMITTANCE) -> Composited:
    """Pure-PyTorch compositing (the spec), vectorised over all samples; autograd differentiates
    it with respect to ``sigmas`` and ``rgbs``."""
    _check_inputs(sigmas, rgbs, deltas, ts, ray_offsets, stop_transmittance)
    n, channels = rgbs.shape
    n_rays = ray_offsets.numel() - 1
    # Geometry gets no gradient (same as the native backward).
    deltas, ts = deltas.detach(), ts.detach()
    counts = ray_offsets[1:] - ray_offsets[:-1]
    if int(ray_offsets[0]) != 0 or int(ray_offsets[-1]) != n:
        raise ValueError(f"composite: ray_offsets must run from 0 to S={n}, got "
                         f"{int(ray_offsets[0])} .. {int(ray_offsets[-1])}")
    if n_rays and bool((counts < 0).any()):
        raise ValueError("composite: ray_offsets must be non-decreasing")
    ray = ray_indices_from_offsets(ray_offsets, n)

    # Optical depth of each sample and its exclusive prefix sum inside its ray: a global cumsum
    # minus the value at the ray's first sample. The global sum grows with S, so it is taken in
    # float64 (in float32 the difference of two large sums would lose all the digits).
    tau = sigmas * deltas
    inclusive = torch.cumsum(tau.double(), 0)
    exclusive = inclusive - tau.double()
    start = exclusive[ray_offsets[ray]] if n else exclusive      # exclusive sum at each ray's first sample
    transmittance = torch.exp(-(exclusive - start)).to(sigmas.dtype)   # T_i

    alpha = 1.0 - torch.exp(-tau)
    weights = transmittance * alpha
    # Early termination: samples whose incoming transmittance already fell below the threshold
    # (T is non-increasing, so this cuts off a suffix of each ray) contribute nothing.
    weights = torch.where(transmittance >= stop_transmittance, weights, torch.zeros_like(weights))

    # Segment sums per ray.
    rgb = rgbs.new_zeros(n_rays, channels).index_add(0, ray, weights[:, None] * rgbs)
    opacity = sigmas.new_zeros(n_rays).index_add(0, ray, weights)
    depth = sigmas.new_zeros(n_rays).index_add(0, ray, weights * ts)
    return Composited(rgb=rgb, opacity=opacity, depth=depth, weights=weights.detach())


class _CompositeFn(torch.autograd.Function):
    """The native forward/backward. The backward recomputes the transmittance front to back
    exactly like the forward (same arithmetic, so the same termination point) and takes the
    suffix sums from the forward outputs."""

    @staticmethod
    def forward(ctx, ext, sigmas, rgbs, deltas, ts, ray_offsets, stop_transmittance):
        rgb, opacity, depth, weights = ext.composite_forward(sigmas, rgbs, deltas, ts, ray_offsets,
                                                            float(stop_transmittance))
        ctx.ext = ext
        ctx.stop = float(stop_transmittance)
        ctx.save_for_backward(sigmas, rgbs, deltas, ts, ray_offsets, rgb, opacity, depth)
        ctx.mark_non_differentiable(weights)
        return rgb, opacity, depth, weights

    @staticmethod
    def backward(ctx, grad_rgb, grad_opacity, grad_depth, _grad_weights):
        sigmas, rgbs, deltas, ts, ray_offsets, rgb, opacity, depth = ctx.saved_tensors
        grad_sigmas, grad_rgbs = ctx.ext.composite_backward(
            grad_rgb.contiguous(), grad_opacity.contiguous(), grad_depth.contiguous(),
            sigmas, rgbs, deltas, ts, ray_offsets, rgb, opacity, depth, ctx.stop)
        return (None, grad_sigmas if ctx.needs_input_grad[1] else None,
                grad_rgbs if ctx.needs_input_grad[2] else None, None, None, None, None)


def composite(sigmas: torch.Tensor, rgbs: torch.Tensor, deltas: torch.Tensor, ts: torch.Tensor,
              ray_offsets: torch.Tensor, stop_transmittance: float = DEFAULT_STOP_TRANSMITTANCE) -> Composited:
    """Composite packed samples front to back (see the module docstring): ``sigmas (S,)`` densities
    (>= 0, already activated), ``rgbs (S, C)``, ``deltas (S,)`` interval lengths, ``ts (S,)`` sample
    distances, ``ray_offsets (R+1,)`` int64. Native kernels when available (float32 and float64),
    else the reference."""
    ext = _native.extension_for(sigmas, rgbs, deltas, ts, ray_offsets)
    if ext is None or sigmas.dtype not in (torch.float32, torch.float64):
        return composite_reference(sigmas, rgbs, deltas, ts, ray_offsets, stop_transmittance)
    _check_inputs(sigmas, rgbs, deltas, ts, ray_offsets, stop_transmittance)
    rgb, opacity, depth, weights = _CompositeFn.apply(
        ext, sigmas.contiguous(), rgbs.contiguous(), deltas.detach().contiguous(), ts.detach().contiguous(),
        ray_offsets.contiguous(), stop_transmittance)
    return Composited(rgb=rgb, opacity=opacity, depth=depth, weights=weights)

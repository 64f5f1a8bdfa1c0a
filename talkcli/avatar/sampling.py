"""Hierarchical ray sampling (NeRF, Mildenhall et al. 2020): stratified coarse samples, then fine
samples drawn by inverse-transform sampling of the coarse weights.

The ``hierarchical`` training mode uses it instead of occupancy-grid marching (no grid to warm up,
at the price of a second field evaluation). Both steps return packed :class:`RaySamples`, so the
compositing op (``ops.composite``) and the renderer consume them like marched samples.

Conventions (``t`` in units of ``|d|``, like the march):

- :func:`stratified`: ``n`` equal bins over ``[near, far]``, one sample per bin (its centre, or a
  uniform point in it); ``deltas`` = the bin width, so the deltas of a ray sum to ``far - near``
  and each sample stands for its own bin (midpoint quadrature when not jittered).
- :func:`importance`: fine ``t`` by the inverse CDF of the piecewise-constant PDF of the coarse
  weights, merged with the coarse ``t``; ``deltas`` = the distance to the next sample and, for the
  last one, the distance to the far end of the bins (left-endpoint quadrature over
  ``[t_0, far]``: the usual NeRF rule, without its "1e10" last interval).

``ts`` and ``deltas`` are float32 constants (the geometry is not learned); ``positions = o + t d``
keeps the rays' autograd graph, like the march (camera refinement).
"""

from __future__ import annotations

import torch

from ..ops.raymarch import RaySamples

__all__ = ["stratified", "importance"]

PDF_PADDING = 1e-5  # added to every coarse weight: empty rays still get a (uniform) PDF


def _check_rays(rays_o: torch.Tensor, rays_d: torch.Tensor) -> None:
    if rays_o.dim() != 2 or rays_o.shape[-1] != 3 or rays_d.shape != rays_o.shape:
        raise ValueError(f"sampling: rays_o and rays_d must both be (R, 3), got {tuple(rays_o.shape)} "
                         f"and {tuple(rays_d.shape)}")


def _pack(rays_o: torch.Tensor, rays_d: torch.Tensor, rays: torch.Tensor, ts: torch.Tensor,
          deltas: torch.Tensor) -> RaySamples:
    """Packed samples of the rays ``rays (M,)`` (increasing), each with the rows of ``ts, deltas (M, K)``."""
    n_rays = rays_o.shape[0]
    device = rays_o.device
    k = ts.shape[1] if ts.dim() == 2 else 0
    counts = torch.zeros(n_rays, dtype=torch.int64, device=device)
    counts.index_fill_(0, rays, k)
    offsets = torch.zeros(n_rays + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    ray_indices = rays.repeat_interleave(k)
    ts, deltas = ts.reshape(-1).float().detach(), deltas.reshape(-1).float().detach()
    directions = rays_d.float().index_select(0, ray_indices)
    positions = rays_o.float().index_select(0, ray_indices) + ts[:, None] * directions
    return RaySamples(positions, directions, ts, deltas, ray_indices, offsets)


@torch.no_grad()
def _stratified_ts(near: torch.Tensor, far: torch.Tensor, n: int,
                   jitter: bool | torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ts, bin widths), each (M, n), for rays with far > near."""
    width = (far - near) / n
    k = torch.arange(n, dtype=torch.float32, device=near.device)
    if jitter is False:
        u = torch.full((near.shape[0], n), 0.5, device=near.device)
    else:
        gen = jitter if isinstance(jitter, torch.Generator) else None
        u = torch.rand(near.shape[0], n, generator=gen, device=near.device)
    ts = near[:, None] + (k + u) * width[:, None]
    # Rounding may land the last jittered sample on far: keep every sample inside [near, far].
    ts = torch.minimum(torch.maximum(ts, near[:, None]), far[:, None])
    return ts, width[:, None].expand(-1, n)


def stratified(rays_o: torch.Tensor, rays_d: torch.Tensor, near: torch.Tensor, far: torch.Tensor, n: int,
               jitter: bool | torch.Generator) -> RaySamples:
    """``n`` samples per ray in ``n`` equal bins of ``[near, far]`` (rays (R, 3), near/far (R,)):
    bin centres when ``jitter`` is False, else one uniform point per bin (drawn from ``jitter``
    when it is a generator). ``deltas`` = the bin width. Rays with ``far <= near`` (misses from
    ``ray_aabb``) get no samples."""
    _check_rays(rays_o, rays_d)
    if int(n) < 1:
        raise ValueError(f"stratified: n must be >= 1, not {n}")
    r = rays_o.shape[0]
    if near.shape != (r,) or far.shape != (r,):
        raise ValueError(f"stratified: near and far must be ({r},), got {tuple(near.shape)} and {tuple(far.shape)}")
    near, far = near.detach().float(), far.detach().float()
    rays = torch.nonzero(far > near).squeeze(1)
    ts, deltas = _stratified_ts(near.index_select(0, rays), far.index_select(0, rays), int(n), jitter)
    return _pack(rays_o, rays_d, rays, ts, deltas)


@torch.no_grad()
def _inverse_cdf(edges: torch.Tensor, weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """t at the quantiles ``u (M, N)`` of the piecewise-constant PDF with bins ``edges (M, K+1)`` and
    masses ``weights (M, K)`` (padded, so every bin has some mass)."""
    pdf = torch.nan_to_num(weights, nan=0.0).clamp_min(0.0) + PDF_PADDING
    cdf = torch.cumsum(pdf / pdf.sum(1, keepdim=True), 1)
    cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf[:, :-1], torch.ones_like(cdf[:, :1])], 1)
    k = weights.shape[1]
    below = (torch.searchsorted(cdf, u.contiguous(), right=True) - 1).clamp(0, k - 1)
    above = below + 1
    c0, c1 = cdf.gather(1, below), cdf.gather(1, above)
    e0, e1 = edges.gather(1, below), edges.gather(1, above)
    span = c1 - c0
    frac = torch.where(span > 0, (u - c0) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(u))
    return e0 + frac.clamp(0.0, 1.0) * (e1 - e0)


def importance(rays_o: torch.Tensor, rays_d: torch.Tensor, coarse: RaySamples, weights: torch.Tensor, n: int,
               generator: torch.Generator | None = None, deterministic: bool = False, *,
               near: torch.Tensor | None = None, far: torch.Tensor | None = None) -> RaySamples:
    """The coarse samples plus ``n`` fine samples per ray, drawn from the PDF ∝ ``weights + 1e-5``
    (``weights (S,)``: the coarse composite weights) over bins with edges at the midpoints of the
    coarse ``t``, sorted per ray (``K + n`` samples for a ray with ``K`` coarse ones).

    The outer bin edges are ``near`` / ``far`` (R,) when given (e.g. from ``ray_aabb``), else the
    first / last coarse ``t`` -/+ half its delta (exactly near / far for bin-centre
    :func:`stratified` samples, within half a bin when jittered). Quantiles are uniform draws from
    ``generator``, or evenly spaced ``(i + 1/2) / n`` when ``deterministic`` (evaluation).
    ``deltas`` = the distance to the next sample; the last sample's runs to the far edge.

    Vectorised over rays, so every ray must have either 0 or the same number of coarse samples
    (what :func:`stratified` gives); anything else raises ValueError.
    """
    _check_rays(rays_o, rays_d)
    if int(n) < 1:
        raise ValueError(f"importance: n must be >= 1, not {n}")
    n = int(n)
    r = rays_o.shape[0]
    if coarse.num_rays != r:
        raise ValueError(f"importance: coarse samples are for {coarse.num_rays} rays, not {r}")
    s = coarse.num_samples
    if weights.shape != (s,):
        raise ValueError(f"importance: weights must be (S={s},), got {tuple(weights.shape)}")
    for name, v in (("near", near), ("far", far)):
        if v is not None and v.shape != (r,):
            raise ValueError(f"importance: {name} must be ({r},), got {tuple(v.shape)}")
    counts = coarse.counts()
    rays = torch.nonzero(counts > 0).squeeze(1)
    if rays.numel() == 0:
        return _pack(rays_o, rays_d, rays, rays_o.new_zeros(0, 0), rays_o.new_zeros(0, 0))
    k = int(counts.index_select(0, rays)[0])
    if bool((counts.index_select(0, rays) != k).any()) or int(coarse.ray_offsets[0]) != 0 or rays.numel() * k != s:
        raise ValueError("importance: every ray needs 0 or the same number of coarse samples "
                         f"(got counts {sorted(set(counts.tolist()))})")
    m = rays.numel()
    device = rays_o.device

    with torch.no_grad():
        ts = coarse.ts.detach().float().reshape(m, k)
        w = weights.detach().float().reshape(m, k)
        ts, order = torch.sort(ts, 1)  # (packed samples are sorted already; cheap insurance)
        w = w.gather(1, order)
        dl = coarse.deltas.detach().float().reshape(m, k).gather(1, order)
        start = ts[:, 0] - 0.5 * dl[:, 0] if near is None else near.detach().float().index_select(0, rays)
        end = ts[:, -1] + 0.5 * dl[:, -1] if far is None else far.detach().float().index_select(0, rays)
        start, end = torch.minimum(start, ts[:, 0]), torch.maximum(end, ts[:, -1])
        edges = torch.cat([start[:, None], 0.5 * (ts[:, 1:] + ts[:, :-1]), end[:, None]], 1)

        if deterministic:
            u = ((torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n).expand(m, n)
        else:
            u = torch.rand(m, n, generator=generator, device=device)
        fine = _inverse_cdf(edges, w, u)

        merged = torch.sort(torch.cat([ts, fine], 1), 1).values
        deltas = torch.cat([merged[:, 1:], end[:, None]], 1) - merged
    return _pack(rays_o, rays_d, rays, merged, deltas)

"""Occupancy grid and ray marching that skips empty space (Instant-NGP style).

Used by the NeRF avatars (R2-Talker's head and torso, torch-ngp/RAD-NeRF style training and
rendering) and by the mesh-anchored avatar to place samples along camera rays only where the
scene has density: an :class:`OccupancyGrid` keeps a decaying max-density estimate per cell of
the bounding box and a bitfield of the cells that count as occupied; :func:`ray_aabb` clips rays
to the box and :func:`march_rays` emits the packed samples (:class:`RaySamples`) that the
compositing op (``composite``) consumes.

Sampling is defined on a per-ray lattice so that every backend gives the same samples, bit for
bit::

    t_0 = near + jitter * dt(near),   t_{k+1} = t_k + dt(t_k),
    dt(t) = clamp(t * cone_angle, step_size, max_step)    (cone_angle = 0: constant step_size)

and a lattice point ``t < far`` is emitted iff the grid cell of ``p = o + t * d`` is occupied
(points outside the box have no cell and are skipped), the first ``max_samples`` of each ray. All
of it is computed in the rays' dtype with plain rounded operations in this order (``t * d``, then
``o + ...``; cell = ``floor((p - aabb_min) * scale)`` with ``scale = resolution / (aabb_max -
aabb_min)`` computed in double and rounded once to the dtype: the cell of ``floor((p - aabb_min) /
extent * resolution)`` with one multiplication instead of a division). The native kernels (``kernels/raymarch.h``) skip the
lattice points in empty cells without testing them (a conservative ray/cell DDA) and pack the
samples in two passes (count, scan, fill).

Gradients flow from ``positions`` and ``directions`` back to ``rays_o`` and ``rays_d`` (camera
refinement); ``ts``, ``deltas`` and the sample set are constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

from . import _native

__all__ = [
    "OccupancySpec",
    "OccupancyGrid",
    "RaySamples",
    "ray_aabb",
    "march_rays",
    "ray_aabb_reference",
    "march_rays_reference",
    "unpack_bits",
    "DensityFn",
]

DensityFn = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------
# Configuration and results
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OccupancySpec:
    """One cascade of ``resolution**3`` cells over the box ``aabb = (xmin, ymin, zmin, xmax, ymax, zmax)``.

    A cell is occupied when its density exceeds ``min(mean density of the grid, threshold)``;
    every update first multiplies all densities by ``decay``.
    """

    resolution: int = 128
    aabb: tuple[float, ...] = (-1.0, -1.0, -1.0, 1.0, 1.0, 1.0)
    decay: float = 0.95
    threshold: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or not 1 <= self.resolution <= 2048:
            raise ValueError(f"occupancy grid: resolution must be an int in 1..2048, not {self.resolution!r}")
        box = tuple(float(v) for v in self.aabb)
        if len(box) != 6:
            raise ValueError(f"occupancy grid: aabb needs 6 values (min xyz, max xyz), got {len(box)}")
        if not all(lo < hi for lo, hi in zip(box[:3], box[3:])) or not all(abs(v) < float("inf") for v in box):
            raise ValueError(f"occupancy grid: aabb must be finite with min < max on every axis, got {box}")
        object.__setattr__(self, "aabb", box)
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"occupancy grid: decay must be in (0, 1], not {self.decay}")
        if not self.threshold >= 0.0:
            raise ValueError(f"occupancy grid: threshold must be >= 0, not {self.threshold}")

    @property
    def num_cells(self) -> int:
        return self.resolution ** 3

    @property
    def aabb_min(self) -> tuple[float, float, float]:
        return self.aabb[0], self.aabb[1], self.aabb[2]

    @property
    def aabb_max(self) -> tuple[float, float, float]:
        return self.aabb[3], self.aabb[4], self.aabb[5]

    @property
    def cell_size(self) -> tuple[float, float, float]:
        r = self.resolution
        return tuple((hi - lo) / r for lo, hi in zip(self.aabb_min, self.aabb_max))  # type: ignore[return-value]

    @property
    def scale(self) -> tuple[float, float, float]:
        """Cells per unit length on each axis (``resolution / extent``, in double)."""
        r = self.resolution
        return tuple(r / (hi - lo) for lo, hi in zip(self.aabb_min, self.aabb_max))  # type: ignore[return-value]


@dataclass
class RaySamples:
    """Packed samples of R rays: the samples of ray r are rows ``ray_offsets[r]:ray_offsets[r + 1]``,
    in increasing t."""

    positions: torch.Tensor    # (S, 3) o + t d
    directions: torch.Tensor   # (S, 3) d of the sample's ray
    ts: torch.Tensor           # (S,) distance along the ray (in units of |d|)
    deltas: torch.Tensor       # (S,) dt(t): the lattice step at the sample
    ray_indices: torch.Tensor  # (S,) int64
    ray_offsets: torch.Tensor  # (R + 1,) int64

    @property
    def num_samples(self) -> int:
        return int(self.ts.shape[0])

    @property
    def num_rays(self) -> int:
        return int(self.ray_offsets.shape[0]) - 1

    def counts(self) -> torch.Tensor:
        """(R,) samples per ray."""
        return self.ray_offsets[1:] - self.ray_offsets[:-1]


# ------------------------------------------------------------------------------------------------
# Bit helpers (torch)
# ------------------------------------------------------------------------------------------------

def _bitfield_bytes(num_cells: int) -> int:
    return (num_cells + 7) // 8


def _full_bitfield(num_cells: int, device=None) -> torch.Tensor:
    """Every cell occupied (padding bits of the last byte stay 0)."""
    return _pack_reference(torch.ones(num_cells, device=device), 0.0)


def unpack_bits(bitfield: torch.Tensor, num_cells: int) -> torch.Tensor:
    """(num_cells,) bool: bit i = bit (i & 7) of byte i >> 3."""
    shifts = torch.arange(8, device=bitfield.device)
    bits = (bitfield.to(torch.int64)[:, None] >> shifts) & 1
    return bits.reshape(-1)[:num_cells].bool()


def _occupied_cells(bitfield: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Bit of each (valid, int64) cell index."""
    byte = bitfield.index_select(0, (cells >> 3).reshape(-1)).reshape(cells.shape)
    return ((byte.to(torch.int64) >> (cells & 7)) & 1) == 1


def _pack_reference(density: torch.Tensor, threshold: float) -> torch.Tensor:
    """uint8 bitfield of ``density.flatten() > threshold`` (threshold rounded to the dtype)."""
    flat = density.reshape(-1)
    occ = (flat > torch.tensor(threshold, dtype=flat.dtype, device=flat.device)).to(torch.int64)
    pad = (-occ.numel()) % 8
    if pad:
        occ = torch.cat([occ, occ.new_zeros(pad)])
    shifts = torch.arange(8, device=flat.device)
    return (occ.view(-1, 8) << shifts).sum(1).to(torch.uint8)


def _pack(density: torch.Tensor, threshold: float) -> torch.Tensor:
    ext = _native.extension_for(density)
    if ext is None or density.dtype not in (torch.float32, torch.float64):
        return _pack_reference(density, threshold)
    return ext.raymarch_pack(density.contiguous(), float(threshold))


def _update_reference(density: torch.Tensor, decay: float, cells: torch.Tensor | None,
                      values: torch.Tensor) -> None:
    """In place: density *= decay, then the max with each value at its cell (None: one per cell)."""
    flat = density.view(-1)
    flat.mul_(decay)
    keep = values >= 0  # densities are non-negative; NaN and negative values are ignored
    if cells is None:
        flat.copy_(torch.where(keep & (values > flat), values, flat))
        return
    keep &= (cells >= 0) & (cells < flat.numel())
    flat.scatter_reduce_(0, cells.masked_select(keep), values.masked_select(keep), "amax", include_self=True)


def _update(density: torch.Tensor, decay: float, cells: torch.Tensor | None, values: torch.Tensor) -> None:
    ext = _native.extension_for(density)
    if ext is None or not density.is_contiguous() or density.dtype not in (torch.float32, torch.float64):
        _update_reference(density, decay, cells, values)
        return
    ext.raymarch_update(density, float(decay), None if cells is None else cells.contiguous(),
                        values.contiguous())


# ------------------------------------------------------------------------------------------------
# Occupancy grid
# ------------------------------------------------------------------------------------------------

class OccupancyGrid(torch.nn.Module):
    """Max-density occupancy grid with decay (Instant-NGP), one cascade.

    Buffers (saved in the state dict, moved by ``.to``):

    - ``density`` (R, R, R) float32, indexed ``[z, y, x]``: the decaying max of the densities seen
      in each cell;
    - ``bitfield`` (ceil(R^3 / 8),) uint8: cell ``i = x + R * (y + R * z)`` is bit ``i & 7`` of
      byte ``i >> 3``.

    A new grid has zero densities and every cell marked occupied, so that the first iterations
    sample everywhere until :meth:`update` has seen the scene (calling :meth:`pack` before any
    update marks every cell empty: the bitfield always follows the densities once packed).
    """

    density: torch.Tensor
    bitfield: torch.Tensor

    def __init__(self, spec: OccupancySpec | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.spec = spec or OccupancySpec()
        r = self.spec.resolution
        self.register_buffer("density", torch.zeros(r, r, r, dtype=torch.float32, device=device))
        self.register_buffer("bitfield", _full_bitfield(self.spec.num_cells, device=device))

    @property
    def resolution(self) -> int:
        return self.spec.resolution

    def extra_repr(self) -> str:
        return f"resolution={self.spec.resolution}, aabb={self.spec.aabb}"

    # -- queries ----------------------------------------------------------------------------------

    def cell_of(self, points: torch.Tensor) -> torch.Tensor:
        """Linear cell index ``x + R * (y + R * z)`` of each point (..., 3) as int64 (...); -1 outside
        the box. Same arithmetic as the march: ``floor((p - aabb_min) * scale)``."""
        return _cell_index(points, self.spec)

    def is_occupied(self, points: torch.Tensor) -> torch.Tensor:
        """(...) bool: the point lies in an occupied cell."""
        cell = self.cell_of(points)
        inside = cell >= 0
        occ = _occupied_cells(self.bitfield, cell.clamp_min(0))
        return inside & occ

    def occupied_fraction(self) -> float:
        """Fraction of cells marked occupied in the bitfield."""
        return float(unpack_bits(self.bitfield, self.spec.num_cells).float().mean())

    def occupancy_threshold(self) -> float:
        """``min(mean density, spec.threshold)``: a cell is occupied above it."""
        return min(float(self.density.mean()), self.spec.threshold)

    # -- updates ----------------------------------------------------------------------------------

    @torch.no_grad()
    def pack(self) -> torch.Tensor:
        """Rebuild the bitfield from the densities (density > min(mean, threshold)); returns it."""
        self.bitfield.copy_(_pack(self.density, self.occupancy_threshold()))
        return self.bitfield

    @torch.no_grad()
    def update(self, density_fn: DensityFn, cells: Literal["all"] | int = "all",
               generator: torch.Generator | None = None, chunk: int = 1 << 18) -> None:
        """One Instant-NGP update: every density *= ``spec.decay``; then, for the chosen cells, the
        density ``density_fn(points (M, 3)) -> (M,)`` at one uniformly jittered point inside the cell
        is max-ed into the cell; then the bitfield is rebuilt (:meth:`pack`).

        ``cells="all"`` evaluates every cell (the warm-up); an int ``n`` evaluates ``n - n // 2``
        uniformly random cells and ``n // 2`` random cells among those currently occupied (uniform
        again when none is). ``density_fn`` is called on chunks of at most ``chunk`` points; values
        are taken as non-negative (NaN and negative values count as 0).

        R2-Talker's "max over conditions" (audio / expression codes) is obtained by passing a
        ``density_fn`` that draws a random training condition on each call: the max over updates
        and chunks then covers the conditions seen.
        """
        spec = self.spec
        device = self.density.device
        if isinstance(cells, str):
            if cells != "all":
                raise ValueError(f"occupancy update: cells must be 'all' or a number, not {cells!r}")
            idx = None
            linear = torch.arange(spec.num_cells, device=device)
        else:
            count = int(cells)
            if count < 0:
                raise ValueError(f"occupancy update: cells must be >= 0, not {count}")
            idx = self._sample_cells(count, generator)
            linear = idx
        points = self._jittered_points(linear, generator)
        values = points.new_zeros(points.shape[0])
        for start in range(0, points.shape[0], chunk):
            part = points[start:start + chunk]
            out = density_fn(part)
            values[start:start + part.shape[0]] = out.reshape(-1).to(values.dtype)
        values = torch.nan_to_num(values, nan=0.0).clamp_min_(0.0)
        _update(self.density, spec.decay, idx, values)
        self.pack()

    def _sample_cells(self, count: int, generator: torch.Generator | None) -> torch.Tensor:
        n = self.spec.num_cells
        device = self.density.device
        n_occ = count // 2
        uniform = torch.randint(0, n, (count - n_occ,), generator=generator, device=device)
        occupied = torch.nonzero(unpack_bits(self.bitfield, n)).squeeze(1)
        if occupied.numel() == 0:
            extra = torch.randint(0, n, (n_occ,), generator=generator, device=device)
        else:
            pick = torch.randint(0, occupied.numel(), (n_occ,), generator=generator, device=device)
            extra = occupied.index_select(0, pick)
        return torch.cat([uniform, extra])

    def _jittered_points(self, cells: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One uniformly random point inside each (linear) cell, float32 (M, 3)."""
        r = self.spec.resolution
        xyz = torch.stack([cells % r, (cells // r) % r, cells // (r * r)], dim=1).to(torch.float32)
        u = torch.rand(xyz.shape, generator=generator, device=xyz.device, dtype=torch.float32)
        lo = torch.tensor(self.spec.aabb_min, dtype=torch.float32, device=xyz.device)
        size = torch.tensor(self.spec.cell_size, dtype=torch.float32, device=xyz.device)
        return lo + (xyz + u) * size


def _grid_constants(spec: OccupancySpec, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """aabb_min and scale as the kernels see them: the double values rounded once to ``dtype``."""
    amin = torch.tensor(spec.aabb_min, dtype=dtype, device=device)
    scale = torch.tensor(spec.scale, dtype=dtype, device=device)
    return amin, scale


def _cell_index(points: torch.Tensor, spec: OccupancySpec) -> torch.Tensor:
    r = spec.resolution
    amin, scale = _grid_constants(spec, points.dtype, points.device)
    w = (points - amin) * scale
    inside = ((w >= 0) & (w < r)).all(-1)
    c = torch.where(inside[..., None], w, torch.zeros_like(w)).to(torch.int64)  # w >= 0: trunc = floor
    cell = c[..., 0] + r * (c[..., 1] + r * c[..., 2])
    return torch.where(inside, cell, torch.full_like(cell, -1))


# ------------------------------------------------------------------------------------------------
# Ray / box
# ------------------------------------------------------------------------------------------------

def _check_rays(rays_o: torch.Tensor, rays_d: torch.Tensor) -> None:
    if rays_o.dim() != 2 or rays_o.shape[-1] != 3 or rays_d.shape != rays_o.shape:
        raise ValueError(f"rays_o and rays_d must both be (R, 3), got {tuple(rays_o.shape)} and {tuple(rays_d.shape)}")
    if rays_o.dtype not in (torch.float32, torch.float64) or rays_d.dtype != rays_o.dtype:
        raise ValueError(f"rays must be float32 or float64 (both the same), got {rays_o.dtype} and {rays_d.dtype}")


def _aabb_tuple(aabb: Sequence[float] | OccupancySpec | OccupancyGrid) -> tuple[float, ...]:
    if isinstance(aabb, OccupancyGrid):
        return aabb.spec.aabb
    if isinstance(aabb, OccupancySpec):
        return aabb.aabb
    box = tuple(float(v) for v in aabb)
    if len(box) != 6:
        raise ValueError(f"aabb needs 6 values (min xyz, max xyz), got {len(box)}")
    return box


def ray_aabb_reference(rays_o: torch.Tensor, rays_d: torch.Tensor, aabb: Sequence[float],
                       min_near: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec of :func:`ray_aabb` in torch (slab method)."""
    box = torch.tensor(_aabb_tuple(aabb), dtype=rays_o.dtype, device=rays_o.device)
    o, d = rays_o.detach(), rays_d.detach()
    inf = torch.tensor(float("inf"), dtype=o.dtype, device=o.device)
    # Per axis: the t interval between the two planes; an axis the ray is parallel to gives all t
    # when the origin lies between its planes and none otherwise.
    t1 = (box[:3] - o) / d
    t2 = (box[3:] - o) / d
    lo = torch.where(t1 < t2, t1, t2)
    hi = torch.where(t1 < t2, t2, t1)
    parallel = d == 0
    between = (o >= box[:3]) & (o <= box[3:])
    lo = torch.where(parallel, torch.where(between, -inf, inf), lo)
    hi = torch.where(parallel, torch.where(between, inf, -inf), hi)
    bad = torch.isnan(lo).any(1) | torch.isnan(hi).any(1)
    mn = torch.tensor(min_near, dtype=o.dtype, device=o.device)
    near = torch.maximum(torch.nan_to_num(lo, nan=0.0).amax(1), mn)
    far = torch.nan_to_num(hi, nan=0.0).amin(1)
    miss = bad | ~(far > near)
    # A miss (or a box segment entirely before min_near) gets near = far = min_near: no samples.
    return torch.where(miss, mn, near), torch.where(miss, mn, far)


def ray_aabb(rays_o: torch.Tensor, rays_d: torch.Tensor, aabb: Sequence[float] | OccupancySpec | OccupancyGrid,
             min_near: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(near, far), each (R,), of the rays ``o + t d`` through ``aabb`` (xmin, ymin, zmin, xmax,
    ymax, zmax), with near >= min_near. Rays that miss the box get ``near = far = min_near``, so
    they get no samples. Not differentiable."""
    _check_rays(rays_o, rays_d)
    box = _aabb_tuple(aabb)
    ext = _native.extension_for(rays_o, rays_d)
    if ext is None:
        return ray_aabb_reference(rays_o, rays_d, box, min_near)
    near, far = ext.raymarch_ray_aabb(rays_o.detach().contiguous(), rays_d.detach().contiguous(), list(box),
                                      float(min_near))
    return near, far


# ------------------------------------------------------------------------------------------------
# Ray marching
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _MarchConfig:
    step_size: float
    max_samples: int
    cone_angle: float
    max_step: float


def _march_config(step_size: float, max_samples: int, cone_angle: float, max_step: float | None) -> _MarchConfig:
    step_size = float(step_size)
    if not step_size > 0:
        raise ValueError(f"march_rays: step_size must be > 0, not {step_size}")
    if int(max_samples) < 1:
        raise ValueError(f"march_rays: max_samples must be >= 1, not {max_samples}")
    if not float(cone_angle) >= 0:
        raise ValueError(f"march_rays: cone_angle must be >= 0, not {cone_angle}")
    max_step = step_size if max_step is None else float(max_step)
    if not max_step >= step_size:
        raise ValueError(f"march_rays: max_step ({max_step}) must be >= step_size ({step_size})")
    return _MarchConfig(step_size, int(max_samples), float(cone_angle), max_step)


def march_rays_reference(rays_o: torch.Tensor, rays_d: torch.Tensor, near: torch.Tensor, far: torch.Tensor,
                         grid: OccupancyGrid, step_size: float, max_samples: int, cone_angle: float = 0.0,
                         max_step: float | None = None, jitter: torch.Tensor | None = None) -> RaySamples:
    """The spec of :func:`march_rays` in torch: enumerate the lattice of every ray (one step k at
    a time, vectorised over the rays still marching), keep the points in occupied cells."""
    _check_rays(rays_o, rays_d)
    cfg = _march_config(step_size, max_samples, cone_angle, max_step)
    return _march_reference(rays_o, rays_d, near, far, grid, cfg, jitter)


def _march_reference(rays_o: torch.Tensor, rays_d: torch.Tensor, near: torch.Tensor, far: torch.Tensor,
                     grid: OccupancyGrid, cfg: _MarchConfig, jitter: torch.Tensor | None) -> RaySamples:
    dtype, device = rays_o.dtype, rays_o.device
    n = rays_o.shape[0]
    r = grid.spec.resolution
    amin, scale = _grid_constants(grid.spec, dtype, device)
    bitfield = grid.bitfield
    o, d = rays_o.detach(), rays_d.detach()
    near, far = near.detach().to(dtype), far.detach().to(dtype)

    def scalar(v: float) -> torch.Tensor:
        return torch.tensor(v, dtype=dtype, device=device)

    step, cone, max_step = scalar(cfg.step_size), scalar(cfg.cone_angle), scalar(cfg.max_step)

    def dt_of(t: torch.Tensor) -> torch.Tensor:
        return torch.clamp(t * cone, step, max_step)

    jit = torch.zeros_like(near) if jitter is None else jitter.detach().to(dtype)
    t = near + jit * dt_of(near)

    counts = torch.zeros(n, dtype=torch.int64, device=device)
    rec_ray: list[torch.Tensor] = []
    rec_t: list[torch.Tensor] = []
    rec_dt: list[torch.Tensor] = []
    # (index_select / masked_select rather than x[idx] / x[mask]: the same, much faster on the CPU.)
    active = torch.nonzero(t < far).squeeze(1)  # rays still marching
    ta = t.index_select(0, active)
    while active.numel() > 0:
        # The lattice point of every active ray: p = o + t d, its cell, its bit.
        p = o.index_select(0, active) + ta[:, None] * d.index_select(0, active)
        w = (p - amin) * scale
        inside = ((w >= 0) & (w < r)).all(1)
        c = torch.where(inside[:, None], w, torch.zeros_like(w)).to(torch.int64)
        cell = c[:, 0] + r * (c[:, 1] + r * c[:, 2])
        occ = inside & _occupied_cells(bitfield, cell)
        dt = dt_of(ta)
        hit = active.masked_select(occ)
        rec_ray.append(hit)
        rec_t.append(ta.masked_select(occ))
        rec_dt.append(dt.masked_select(occ))
        counts.index_add_(0, hit, torch.ones_like(hit))
        # Next lattice point; a ray stops past far, at max_samples, or when t stops increasing.
        tn = ta + dt
        keep = (tn < far.index_select(0, active)) & (counts.index_select(0, active) < cfg.max_samples) & (tn > ta)
        active, ta = active.masked_select(keep), tn.masked_select(keep)

    if rec_ray:
        ray_indices = torch.cat(rec_ray)
        ts = torch.cat(rec_t)
        deltas = torch.cat(rec_dt)
    else:
        ray_indices = torch.zeros(0, dtype=torch.int64, device=device)
        ts = deltas = torch.zeros(0, dtype=dtype, device=device)
    # Records come step by step; a stable sort by ray keeps each ray's samples in t order.
    order = torch.sort(ray_indices, stable=True).indices
    ray_indices, ts, deltas = (x.index_select(0, order) for x in (ray_indices, ts, deltas))
    offsets = torch.zeros(n + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    # Positions from the (possibly differentiable) rays, in the same order of operations.
    directions = rays_d.index_select(0, ray_indices)
    positions = rays_o.index_select(0, ray_indices) + ts[:, None] * directions
    return RaySamples(positions, directions, ts, deltas, ray_indices, offsets)


class _NativeMarch(torch.autograd.Function):
    """The native march (forward: count, scan, fill) with the backward of positions = o + t d and
    directions = d to the rays (a per-ray segmented sum over the packed rows)."""

    @staticmethod
    def forward(ctx, rays_o, rays_d, near, far, jitter, ext, grid: OccupancyGrid, cfg: _MarchConfig):
        spec = grid.spec
        positions, directions, ts, deltas, ray_indices, offsets = ext.raymarch_march(
            rays_o.contiguous(), rays_d.contiguous(), near.contiguous(), far.contiguous(),
            None if jitter is None else jitter.contiguous(), grid.bitfield.contiguous(), spec.resolution,
            list(spec.aabb_min), list(spec.scale), cfg.step_size, cfg.cone_angle, cfg.max_step, cfg.max_samples)
        ctx.mark_non_differentiable(ts, deltas, ray_indices, offsets)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(ts, offsets)
        ctx.ext = ext
        return positions, directions, ts, deltas, ray_indices, offsets

    @staticmethod
    def backward(ctx, grad_positions, grad_directions, *_):
        ts, offsets = ctx.saved_tensors
        if grad_positions is None and grad_directions is None:
            return (None,) * 8
        grad_o, grad_d = ctx.ext.raymarch_march_backward(
            None if grad_positions is None else grad_positions.contiguous(),
            None if grad_directions is None else grad_directions.contiguous(), ts, offsets)
        return (grad_o if ctx.needs_input_grad[0] else None, grad_d if ctx.needs_input_grad[1] else None,
                None, None, None, None, None, None)


def march_rays(rays_o: torch.Tensor, rays_d: torch.Tensor, near: torch.Tensor, far: torch.Tensor,
               grid: OccupancyGrid, step_size: float, max_samples: int, cone_angle: float = 0.0,
               max_step: float | None = None, jitter: torch.Tensor | None = None) -> RaySamples:
    """Packed samples of the rays ``o + t d`` (rays_o, rays_d (R, 3); near, far, jitter (R,)) in the
    occupied cells of ``grid``: every lattice point ``t < far`` of

        t_0 = near + jitter * dt(near),  t_{k+1} = t_k + dt(t_k),
        dt(t) = clamp(t * cone_angle, step_size, max_step or step_size)

    whose cell is occupied, the first ``max_samples`` per ray (jitter in [0, 1), zeros when None).
    ``deltas`` are dt of each sample. Positions and directions are differentiable w.r.t. the rays.
    """
    _check_rays(rays_o, rays_d)
    cfg = _march_config(step_size, max_samples, cone_angle, max_step)
    n = rays_o.shape[0]
    for name, v in (("near", near), ("far", far)) + ((("jitter", jitter),) if jitter is not None else ()):
        if v.shape != (n,):
            raise ValueError(f"march_rays: {name} must be ({n},), got {tuple(v.shape)}")
    dtype = rays_o.dtype
    near, far = near.to(dtype), far.to(dtype)
    jitter = None if jitter is None else jitter.to(dtype)
    ext = _native.extension_for(rays_o, rays_d, near, far, grid.bitfield)
    if ext is None:
        return _march_reference(rays_o, rays_d, near, far, grid, cfg, jitter)
    out = _NativeMarch.apply(rays_o, rays_d, near.detach(), far.detach(),
                             None if jitter is None else jitter.detach(), ext, grid, cfg)
    return RaySamples(*out)

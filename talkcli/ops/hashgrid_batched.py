"""Batched hash grids: many small multi-resolution hash grids, one item's grids per query.

Used by the mesh-anchored avatar model (MonoAvatar++): each of the V face-mesh vertices carries M
tiny 3D hash grids. A ray sample's K nearest vertices each evaluate their M grids at the sample's
coordinates in that vertex's local frame (normalised to [0, 1]^3); the results are blended outside
this op. So the op takes

- ``x`` (Q, D) query coordinates in [0, 1]^D (one row per sample and neighbour),
- ``item`` (Q,) int64 in [0, V): whose grids the query reads,
- ``tables`` (V, M, S, F): S = ``spec.n_entries`` rows per grid, level l's rows at ``spec.offsets[l]``
  (the layout of :mod:`talkcli.ops.hashspec`, i.e. tiny-cuda-nn's),

and returns (Q, M, L*F): for each query and each of its item's M grids the standard hash encoding
(tiny-cuda-nn's definition: position scaled per level with ``pos_fract``, the 2^D cell corners indexed
densely or hashed by ``grid_index``, multilinear weights, features level-major). An optional level
mask (L,) switches levels off (coarse-to-fine training): their features are zero and get no gradient.

Gradients flow to the tables and to ``x`` (sample coordinates depend on the warp field and the vertex
frames). :func:`batched_hash_encode_reference` is the spec in plain PyTorch;
:func:`batched_hash_encode` runs the native kernels (``kernels/*/hashgrid_batched.*``) when they are
available (see :mod:`talkcli.ops._native`), else the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence, Union

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import _native, hashspec
from .hashspec import HashGridSpec

LevelMask = Union[torch.Tensor, Sequence[bool], None]

# The MonoAvatar++ per-vertex grids: 2 levels of 2^8 entries (both hashed), 4 features, 32 -> 64.
MONOAVATAR_SPEC = HashGridSpec(dims=3, levels=2, features=4, log2_table=8, base_resolution=32.0,
                               finest_resolution=64.0)


@dataclass(frozen=True)
class _LevelArgs:
    """The spec's level geometry as the native kernels take it (plain lists)."""

    scales: list[float]
    resolutions: list[int]
    sizes: list[int]
    offsets: list[int]
    hashed: list[int]

    def as_tuple(self) -> tuple:
        return self.scales, self.resolutions, self.sizes, self.offsets, self.hashed


@lru_cache(maxsize=64)
def _level_args(spec: HashGridSpec) -> _LevelArgs:
    return _LevelArgs(
        scales=[float(s) for s in spec.scales.tolist()],
        resolutions=[int(r) for r in spec.resolutions.tolist()],
        sizes=[int(s) for s in spec.sizes.tolist()],
        offsets=[int(o) for o in spec.offsets.tolist()],
        hashed=[int(h) for h in spec.hashed.tolist()],
    )


def _check(x: torch.Tensor, item: torch.Tensor, tables: torch.Tensor, spec: HashGridSpec) -> None:
    if x.dim() != 2 or x.shape[1] != spec.dims:
        raise ValueError(f"batched hash grids: x must be (Q, {spec.dims}), got {tuple(x.shape)}")
    if item.shape != (x.shape[0],):
        raise ValueError(f"batched hash grids: item must be ({x.shape[0]},), got {tuple(item.shape)}")
    if item.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"batched hash grids: item must be an integer tensor, got {item.dtype}")
    if tables.dim() != 4 or tables.shape[2] != spec.n_entries or tables.shape[3] != spec.features:
        raise ValueError(f"batched hash grids: tables must be (V, M, {spec.n_entries}, {spec.features}), "
                         f"got {tuple(tables.shape)}")
    if tables.shape[1] < 1:
        raise ValueError("batched hash grids: need at least one grid per item (M >= 1)")


def _level_mask(level_mask: LevelMask, levels: int, device: torch.device) -> torch.Tensor | None:
    """(L,) bool tensor (True = level on) or None (all on); nonzero counts as on."""
    if level_mask is None:
        return None
    mask = torch.as_tensor(level_mask, device=device)
    if mask.shape != (levels,):
        raise ValueError(f"batched hash grids: level_mask must have {levels} entries, got {tuple(mask.shape)}")
    return mask != 0 if mask.dtype != torch.bool else mask


# --------------------------------------------------------------------------- reference (the spec)

def batched_hash_encode_reference(x: torch.Tensor, item: torch.Tensor, tables: torch.Tensor, spec: HashGridSpec,
                                  level_mask: LevelMask = None) -> torch.Tensor:
    """Pure-PyTorch batched hash encoding: (Q, D) x, (Q,) item, (V, M, S, F) tables -> (Q, M, L*F).

    Differentiable by autograd in ``x`` and ``tables`` (float32 or float64; x is cast to the tables'
    dtype). Item ids outside [0, V) raise ValueError.
    """
    _check(x, item, tables, spec)
    x = x.to(tables.dtype)
    item = item.long()
    n_items, n_grids, n_rows, n_feat = tables.shape
    if item.numel() and (int(item.min()) < 0 or int(item.max()) >= n_items):
        raise ValueError(f"batched hash grids: item ids must lie in [0, {n_items})")
    mask = _level_mask(level_mask, spec.levels, x.device)
    dims = spec.dims
    # Corner c of a cell takes the upper neighbour along dim d when bit d of c is set: (2^D, D).
    bits = torch.tensor([[(c >> d) & 1 for d in range(dims)] for c in range(1 << dims)], device=x.device)
    upper = bits.bool()
    flat = tables.reshape(-1, n_feat)  # all rows of all grids of all items
    # First row of grid m of the query's item: (Q, M).
    grid_base = (item[:, None] * n_grids + torch.arange(n_grids, device=x.device)) * n_rows
    outs = []
    for level in range(spec.levels):
        cell, frac = hashspec.pos_fract(x, float(spec.scales[level]))            # (Q, D) int64, (Q, D)
        corner = cell[:, None, :] + bits                                         # (Q, 2^D, D)
        idx = hashspec.grid_index(corner, int(spec.resolutions[level]), int(spec.sizes[level]),
                                  bool(spec.hashed[level]))                      # (Q, 2^D) rows in the level
        f = frac[:, None, :]
        weight = torch.where(upper, f, 1 - f).prod(-1)                          # (Q, 2^D) multilinear weights
        rows = grid_base[:, :, None] + int(spec.offsets[level]) + idx[:, None, :]  # (Q, M, 2^D)
        feats = (weight[:, None, :, None] * flat[rows]).sum(2)                   # (Q, M, F)
        if mask is not None:  # a level that is off: zero features, no gradient
            feats = torch.where(mask[level], feats, torch.zeros_like(feats))
        outs.append(feats)
    return torch.cat(outs, dim=-1)


# --------------------------------------------------------------------------- native

class _BatchedHashEncode(torch.autograd.Function):
    """Native forward/backward. On the CPU the queries are sorted by item once (counting sort): the
    forward visits them item after item (cache locality) and the backward's table gradient is a
    sorted scatter without atomics."""

    @staticmethod
    def forward(ctx, x, tables, item, mask, levels: _LevelArgs, ext):  # type: ignore[override]
        order = start = None
        if not tables.is_cuda:
            order, start = ext.hashgrid_batched_sort(item, tables.shape[0])
        out = ext.hashgrid_batched_forward(x, item, tables, *levels.as_tuple(), level_mask=mask, order=order,
                                         start=start)
        ctx.save_for_backward(x, tables, item, mask, order, start)
        ctx.levels = levels
        ctx.ext = ext
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, tables, item, mask, order, start = ctx.saved_tensors
        need_dx, need_dtables = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dtables = ctx.ext.hashgrid_batched_backward(
            grad_out.contiguous(), x, item, tables, *ctx.levels.as_tuple(), level_mask=mask, order=order, start=start,
            need_dx=need_dx, need_dtables=need_dtables)
        return dx, dtables, None, None, None, None


def batched_hash_encode(x: torch.Tensor, item: torch.Tensor, tables: torch.Tensor, spec: HashGridSpec,
                        level_mask: LevelMask = None) -> torch.Tensor:
    """Batched hash encoding (Q, M, L*F): native kernels when available, else the reference.

    x (Q, D) in [0, 1]^D, item (Q,) int64 in [0, V), tables (V, M, spec.n_entries, spec.features);
    level_mask (L,) bool / 0-1 values or None. Gradients to x and tables. Item ids outside [0, V)
    raise ValueError, except on CUDA tensors, where checking would synchronise: there they give
    zero features and no gradient.
    """
    ext = _native.extension_for(x, item, tables)
    if ext is None or not hasattr(ext, "hashgrid_batched_forward"):
        return batched_hash_encode_reference(x, item, tables, spec, level_mask)
    _check(x, item, tables, spec)
    mask = _level_mask(level_mask, spec.levels, tables.device)
    if mask is not None:
        mask = mask.to(torch.uint8).contiguous()
    x = x.to(tables.dtype).contiguous()
    return _BatchedHashEncode.apply(x, tables.contiguous(), item.long().contiguous(), mask, _level_args(spec), ext)


class BatchedHashGrids(nn.Module):
    """``n_items`` x ``n_grids`` hash grids of geometry ``spec``; ``forward(x, item)`` evaluates the
    grids of each query's item: (Q, M, L*F)."""

    def __init__(self, n_items: int, n_grids: int, spec: HashGridSpec = MONOAVATAR_SPEC, init_scale: float = 1e-4):
        super().__init__()
        if n_items < 0 or n_grids < 1:
            raise ValueError(f"batched hash grids: need n_items >= 0 and n_grids >= 1, got {n_items}, {n_grids}")
        self.spec = spec
        self.tables = nn.Parameter(torch.empty(n_items, n_grids, spec.n_entries, spec.features))
        with torch.no_grad():
            self.tables.uniform_(-init_scale, init_scale)

    @property
    def n_items(self) -> int:
        return self.tables.shape[0]

    @property
    def n_grids(self) -> int:
        return self.tables.shape[1]

    @property
    def output_dim(self) -> int:
        return self.spec.output_dim

    def forward(self, x: torch.Tensor, item: torch.Tensor, level_mask: LevelMask = None) -> torch.Tensor:
        return batched_hash_encode(x, item, self.tables, self.spec, level_mask)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"items={self.n_items}, grids={self.n_grids}, dims={s.dims}, levels={s.levels}, "
                f"features={s.features}, table=2^{s.log2_table}, resolution={s.base_resolution:g}->"
                f"{s.finest_resolution:g}")

"""Multi-resolution hash encoding (Instant-NGP; tiny-cuda-nn's definition and table layout).

A point x in [0, 1]^D (D = 2 or 3) is encoded by L levels of increasingly fine grids. On level l
the point falls in a grid cell; the feature vectors (F values) stored at the cell's 2^D corners are
blended (bi/trilinearly) and the L blended vectors are concatenated, level-major, into L*F
features. Coarse levels are indexed densely, fine ones through a spatial hash into a table of at
most 2^T rows; all levels share one flat trainable table (``HashGridSpec`` in ``hashspec`` holds
the geometry). Points outside [0, 1] are allowed: their indices wrap through the modulo.

It is the positional encoding of the avatar's radiance field and of the deformation (warp) field
and landmark encoder, which also need the gradient with respect to the points. A level mask turns
levels off for coarse-to-fine training: masked levels output zeros and get no gradients.

- ``hash_encode_reference``: the pure-PyTorch specification (vectorised over points, autograd for
  both the table and the points);
- ``hash_encode``: the dispatch point (native C++/CUDA kernels in ``kernels/*hashgrid*`` when
  available, see ``_native``; otherwise the reference);
- ``HashGrid``: the module holding the table.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import _native
from .hashspec import HashGridSpec, grid_index, pos_fract

__all__ = ["HashGrid", "HashGridSpec", "hash_encode", "hash_encode_reference"]


def _active_levels(spec: HashGridSpec, level_mask: torch.Tensor | None) -> list[bool]:
    if level_mask is None:
        return [True] * spec.levels
    if level_mask.shape != (spec.levels,):
        raise ValueError(f"hash grid: level_mask must have shape ({spec.levels},), not {tuple(level_mask.shape)}")
    return [bool(v) for v in level_mask.detach().cpu().tolist()]


def _check(x: torch.Tensor, table: torch.Tensor, spec: HashGridSpec) -> None:
    if x.shape[-1] != spec.dims:
        raise ValueError(f"hash grid: points must have {spec.dims} coordinates, got shape {tuple(x.shape)}")
    if table.shape != (spec.n_entries, spec.features):
        raise ValueError(f"hash grid: table must have shape ({spec.n_entries}, {spec.features}), "
                         f"not {tuple(table.shape)}")


def hash_encode_reference(x: torch.Tensor, table: torch.Tensor, spec: HashGridSpec,
                          level_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The encoding of points ``x`` (..., D) with ``table`` (n_entries, F): (..., L*F), level-major.

    Differentiable by autograd with respect to ``table`` and ``x``. The cells and fractions come from
    ``hashspec.pos_fract`` (float32 inputs are rounded like the kernels' fma).
    """
    _check(x, table, spec)
    lead = x.shape[:-1]
    pts = x.reshape(-1, spec.dims)
    n, dims, feats = pts.shape[0], spec.dims, spec.features
    active = _active_levels(spec, level_mask)
    # the 2^D corner offsets, bit d of corner b being dimension d (the kernels' order): (2^D, D)
    corners = torch.arange(2 ** dims, device=x.device)
    bits = ((corners[:, None] >> torch.arange(dims, device=x.device)) & 1).bool()
    outs = []
    for level in range(spec.levels):
        if not active[level]:
            outs.append(table.new_zeros(n, feats))
            continue
        cell, frac = pos_fract(pts, float(spec.scales[level]))                 # (N, D) int64, (N, D)
        corner = cell[:, None, :] + bits.long()                                 # (N, 2^D, D)
        rows = grid_index(corner, int(spec.resolutions[level]), int(spec.sizes[level]),
                          bool(spec.hashed[level])) + int(spec.offsets[level])  # (N, 2^D)
        # weight of corner b: prod_d (b_d ? f_d : 1 - f_d)
        w = torch.where(bits, frac[:, None, :], 1 - frac[:, None, :]).prod(-1).to(table.dtype)  # (N, 2^D)
        outs.append((w[..., None] * table[rows]).sum(1))                        # (N, F)
    return torch.cat(outs, 1).reshape(*lead, spec.levels * feats)


@functools.lru_cache(maxsize=64)
def _level_tensors(spec: HashGridSpec) -> tuple[torch.Tensor, ...]:
    """The level geometry as the native wrappers take it (CPU tensors, read on the host)."""
    t = spec.level_tensors("cpu")
    return t["scales"], t["resolutions"], t["sizes"], t["offsets"], t["hashed"]


class _HashEncodeNative(torch.autograd.Function):
    """The native forward and backward (table gradient always, input gradient when x needs it)."""

    @staticmethod
    def forward(ctx, x, table, ext, levels, mask):
        ctx.save_for_backward(x, table)
        ctx.ext, ctx.levels, ctx.mask = ext, levels, mask
        return ext.hashgrid_forward(x, table, *levels, mask)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, table = ctx.saved_tensors
        ext, levels, mask = ctx.ext, ctx.levels, ctx.mask
        grad_table, grad_x = ext.hashgrid_backward(x, table, grad_out.contiguous(), *levels, mask,
                                                   ctx.needs_input_grad[1], ctx.needs_input_grad[0])
        return grad_x, grad_table, None, None, None


def hash_encode(x: torch.Tensor, table: torch.Tensor, spec: HashGridSpec,
                level_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hash-encode points ``x`` (..., D) with ``table`` (n_entries, F) -> (..., L*F).

    ``level_mask`` (L,) bool/uint8 turns levels off (zero output, no gradients); None: all on.
    Differentiable with respect to ``table`` and ``x``. x is cast to the table's dtype.
    """
    _check(x, table, spec)
    if x.dtype != table.dtype:
        x = x.to(table.dtype)
    ext = _native.extension_for(x, table)
    if ext is None:
        return hash_encode_reference(x, table, spec, level_mask)
    lead = x.shape[:-1]
    mask = None
    if level_mask is not None:
        _active_levels(spec, level_mask)  # shape check
        mask = level_mask.detach().to("cpu", torch.uint8)
    out = _HashEncodeNative.apply(x.reshape(-1, spec.dims).contiguous(), table.contiguous(), ext,
                                  _level_tensors(spec), mask)
    return out.reshape(*lead, spec.output_dim)


class HashGrid(nn.Module):
    """A trainable multi-resolution hash grid: ``forward(x (..., D), level_mask=None) -> (..., L*F)``.

    The table is initialised uniform(-init_scale, init_scale), as tiny-cuda-nn does.
    """

    def __init__(self, spec: HashGridSpec, init_scale: float = 1e-4):
        super().__init__()
        self.spec = spec
        self.table = nn.Parameter(torch.empty(spec.n_entries, spec.features).uniform_(-init_scale, init_scale))

    @property
    def output_dim(self) -> int:
        return self.spec.output_dim

    def forward(self, x: torch.Tensor, level_mask: torch.Tensor | None = None) -> torch.Tensor:
        return hash_encode(x, self.table, self.spec, level_mask)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"dims={s.dims}, levels={s.levels}, features={s.features}, log2_table={s.log2_table}, "
                f"resolution={s.base_resolution:g}..{s.finest_resolution:g}, entries={s.n_entries}")

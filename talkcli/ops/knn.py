"""The k nearest mesh vertices of sample points, through a hierarchical search grid.

Used by the mesh-anchored avatar (MonoAvatar++, "hierarchical k-NN search", Sec. 3.4): every ray
sample pulls embeddings from the hash tables attached to its K = 3 nearest vertices of the
per-frame, deforming face mesh (~2000 vertices). Brute force costs V distances per sample. Instead,
once per frame, ``build_knn_grid`` covers the mesh's padded bounding box with a cubic grid of
64^3 cells and stores, per cell, the K' = 12 vertices nearest to the cell's *centre* (exactly: the
paper searches "K' nearest neighbors of the voxel center from all 3DMM vertices"); ``knn_query``
then compares each sample only with the K' candidates of its cell. That is approximate: a sample's
true K nearest are not always among its cell's candidates (rarely, near the surface; see the tests).
``knn_brute`` is the exact search, for comparison.

Geometry (shared by the reference and the kernels, see ``kernels/knn.h``):

- the grid is a cube of side ``s = (1 + 2 * padding) * e`` (``e`` the largest side of the vertices'
  bounding box; 1 when all vertices coincide) centred on the bounding box; ``lo`` is its corner
  (rounded to the vertices' dtype), ``cell = s / R``;
- cell ``(i, j, l)`` has the flat index ``i + R * (j + R * l)`` and the centre
  ``lo + (i + 0.5) * cell`` per axis;
- a point's cell is ``floor((p - lo) * (1 / cell))`` per axis, clamped to ``[0, R - 1]``: points
  outside the grid use the nearest cell;
- squared distances are ``(dx*dx + dy*dy) + dz*dz`` in the input dtype, neighbours come in
  ascending (squared distance, vertex index) order, and missing ones (fewer vertices than asked)
  are index -1 with squared distance +inf.

No gradients: the results are indices, and ``dist2`` is for convenience (the caller recomputes the
distances it differentiates).

``build_knn_grid``, ``knn_query`` and ``knn_brute`` are the dispatch points: native kernels
(``kernels/cpu/knn.cpp``, ``kernels/cuda/knn.cu``) or the pure-PyTorch ``*_reference`` functions,
the spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import _native

MAX_K = 64  # the largest K' (candidates per cell) and k (neighbours) the kernels handle (kKnnMaxK)


@dataclass(frozen=True)
class KnnGridSpec:
    """The search grid: ``resolution`` cells per side, ``candidates`` (K') vertices stored per
    cell, ``k`` neighbours per query (for the callers), and ``padding``, the fraction of the
    bounding box's largest side added on each side."""

    resolution: int = 64
    candidates: int = 12
    k: int = 3
    padding: float = 0.1

    def __post_init__(self):
        if not isinstance(self.resolution, int) or not 1 <= self.resolution <= 256:
            raise ValueError(f"knn grid: resolution must be an int in 1..256, not {self.resolution!r}")
        if not isinstance(self.candidates, int) or not 1 <= self.candidates <= MAX_K:
            raise ValueError(f"knn grid: candidates (K') must be an int in 1..{MAX_K}, not {self.candidates!r}")
        if not isinstance(self.k, int) or not 1 <= self.k <= self.candidates:
            raise ValueError(f"knn grid: k must be an int in 1..candidates ({self.candidates}), not {self.k!r}")
        if not (isinstance(self.padding, (int, float)) and math.isfinite(self.padding) and self.padding >= 0):
            raise ValueError(f"knn grid: padding must be a finite number >= 0, not {self.padding!r}")


@dataclass
class KnnGrid:
    """A built search grid: ``lo (3,)`` its corner (the vertices' dtype and device), ``cell`` the
    side of its cubic cells, ``resolution`` cells per side, ``candidates (R^3, K')`` int32 the
    vertices nearest to each cell centre, nearest first (-1 where there are fewer than K'
    vertices), and ``num_verts`` the number of vertices it was built from."""

    lo: torch.Tensor
    cell: float
    resolution: int
    candidates: torch.Tensor
    num_verts: int
    lo_values: tuple = field(init=False, repr=False)  # lo as Python floats (for the kernels)

    def __post_init__(self):
        if self.lo.shape != (3,) or self.lo.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"knn grid: lo must be a (3,) float tensor, got {tuple(self.lo.shape)} {self.lo.dtype}")
        if not (math.isfinite(self.cell) and self.cell > 0):
            raise ValueError(f"knn grid: the cell size must be positive, not {self.cell}")
        r = self.resolution
        if self.candidates.dim() != 2 or self.candidates.shape[0] != r ** 3 or self.candidates.dtype != torch.int32:
            raise ValueError(f"knn grid: candidates must be ({r}^3, K') int32, got "
                             f"{tuple(self.candidates.shape)} {self.candidates.dtype}")
        self.lo_values = tuple(float(x) for x in self.lo.tolist())

    @property
    def num_candidates(self) -> int:
        """K', the candidates per cell."""
        return int(self.candidates.shape[1])


# --- checks and the shared geometry ----------------------------------------------------------------

def _check_xyz(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2 or t.shape[1] != 3:
        raise ValueError(f"knn: {name} must have shape (n, 3), got {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"knn: {name} must be float32 or float64, got {t.dtype}")


def _check_points_verts(points: torch.Tensor, verts: torch.Tensor, k: int) -> None:
    _check_xyz("points", points)
    _check_xyz("verts", verts)
    if points.dtype != verts.dtype or points.device != verts.device:
        raise ValueError(f"knn: points and verts must share dtype and device, got {points.dtype} on "
                         f"{points.device} and {verts.dtype} on {verts.device}")
    if verts.shape[0] < 1:
        raise ValueError("knn: need at least one vertex")
    if not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"knn: k must be an int in 1..{MAX_K}, not {k!r}")


def _check_query(points: torch.Tensor, verts: torch.Tensor, grid: KnnGrid, k: int) -> None:
    _check_points_verts(points, verts, k)
    if verts.shape[0] != grid.num_verts:
        raise ValueError(f"knn_query: the grid was built from {grid.num_verts} vertices, got {verts.shape[0]}")
    if k > grid.num_candidates:
        raise ValueError(f"knn_query: k={k} exceeds the grid's {grid.num_candidates} candidates per cell")
    if grid.candidates.device != verts.device:
        raise ValueError("knn_query: the grid and the vertices are on different devices")


def knn_grid_frame(verts: torch.Tensor, spec: KnnGridSpec) -> tuple[torch.Tensor, float]:
    """The grid's corner ``lo (3,)`` (``verts``' dtype and device) and cell size for these vertices:
    a cube of side ``(1 + 2 * padding) * (largest side of the bounding box)`` centred on the box."""
    _check_xyz("verts", verts)
    if verts.shape[0] < 1:
        raise ValueError("build_knn_grid: need at least one vertex")
    v = verts.detach().double()
    if not bool(torch.isfinite(v).all()):
        raise ValueError("build_knn_grid: the vertices must be finite")
    vmin, vmax = v.amin(0), v.amax(0)
    extent = float((vmax - vmin).max())
    side = extent * (1.0 + 2.0 * spec.padding) if extent > 0 else 1.0
    lo = ((vmin + vmax) * 0.5 - side * 0.5).to(verts.dtype)
    return lo, side / spec.resolution


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` rounded to ``like``'s dtype, as the kernels round it."""
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _dist2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distances ``(dx*dx + dy*dy) + dz*dz`` between broadcast ``a (..., 3)`` and ``b (..., 3)``."""
    d = a - b
    dd = d * d
    return dd[..., 0] + dd[..., 1] + dd[..., 2]


def _select(d2: torch.Tensor, ids: torch.Tensor, k: int,
            ids_ascending: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``k`` entries first in (squared distance, index) order; ``ids`` < 0 and
    entries that are not finite (inf, NaN) count as missing: index -1, +inf. Pads to ``k`` columns."""
    n, m = d2.shape
    d2 = torch.where(ids >= 0, d2, torch.full_like(d2, math.inf))
    # Sort by index (unless the rows already are), then stably by distance: ties keep the lower
    # index first.
    if not ids_ascending:
        by_id = torch.argsort(torch.where(ids >= 0, ids, torch.full_like(ids, 2 ** 62)), dim=1, stable=True)
        ids, d2 = ids.gather(1, by_id), d2.gather(1, by_id)
    order = torch.argsort(d2, dim=1, stable=True)[:, :k]
    ids, d2 = ids.gather(1, order), d2.gather(1, order)
    missing = ~(d2 < math.inf)
    ids = torch.where(missing, torch.full_like(ids, -1), ids)
    d2 = torch.where(missing, torch.full_like(d2, math.inf), d2)
    if m < k:
        ids = torch.cat([ids, ids.new_full((n, k - m), -1)], 1)
        d2 = torch.cat([d2, d2.new_full((n, k - m), math.inf)], 1)
    return ids, d2


def _chunk_rows(n_cols: int) -> int:
    """Rows per chunk so that a (rows, n_cols, 3) temporary stays around 2^22 elements."""
    return max(1, (1 << 22) // max(1, 3 * n_cols))


# --- the reference (the spec) ----------------------------------------------------------------------

@torch.no_grad()
def build_knn_grid_reference(verts: torch.Tensor, spec: KnnGridSpec = KnnGridSpec()) -> KnnGrid:
    """Pure-PyTorch build: brute force over all vertices for every cell centre, in chunks."""
    lo, cell = knn_grid_frame(verts, spec)
    r, kc, nv = spec.resolution, spec.candidates, verts.shape[0]
    verts = verts.detach()
    # Cell centres in flat order (x fastest), each operation rounded in the vertices' dtype.
    flat = torch.arange(r ** 3, device=verts.device)
    ijl = torch.stack([flat % r, (flat // r) % r, flat // (r * r)], 1).to(verts.dtype)
    centres = lo + (ijl + 0.5) * _scalar(cell, verts)
    ids = torch.arange(nv, device=verts.device).expand(1, nv)
    rows = []
    for c in centres.split(_chunk_rows(nv)):
        d2 = _dist2(c[:, None, :], verts[None, :, :])                        # (C, V)
        best, _ = _select(d2, ids.expand(c.shape[0], nv), kc, ids_ascending=True)   # -1 beyond V
        rows.append(best)
    cand = torch.cat(rows).to(torch.int32)
    return KnnGrid(lo=lo, cell=cell, resolution=r, candidates=cand.contiguous(), num_verts=nv)


def cell_index_reference(points: torch.Tensor, grid: KnnGrid) -> torch.Tensor:
    """The flat cell index ``(N,)`` int64 of each point (outside points clamp to the nearest cell)."""
    r = grid.resolution
    t = (points - grid.lo.to(points.dtype)) * _scalar(1.0 / grid.cell, points)
    t = torch.nan_to_num(t, nan=0.0)
    ijl = torch.floor(t).clamp(0, r - 1).long()
    return ijl[:, 0] + r * (ijl[:, 1] + r * ijl[:, 2])


@torch.no_grad()
def knn_query_reference(points: torch.Tensor, verts: torch.Tensor, grid: KnnGrid,
                        k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch query: the ``k`` nearest of each point among its cell's candidates."""
    _check_query(points, verts, grid, k)
    points, verts = points.detach(), verts.detach()
    cand = grid.candidates[cell_index_reference(points, grid)].long()        # (N, K')
    cand = torch.where(cand < verts.shape[0], cand, torch.full_like(cand, -1))
    d2 = _dist2(points[:, None, :], verts[cand.clamp(min=0)])                # (N, K')
    return _select(d2, cand, k)


@torch.no_grad()
def knn_brute_reference(points: torch.Tensor, verts: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch exact k nearest vertices, brute force in chunks of points."""
    _check_points_verts(points, verts, k)
    points, verts = points.detach(), verts.detach()
    nv = verts.shape[0]
    ids = torch.arange(nv, device=verts.device).expand(1, nv)
    out_i, out_d = [], []
    for p in points.split(_chunk_rows(nv)):
        d2 = _dist2(p[:, None, :], verts[None, :, :])                          # (C, V)
        i, d = _select(d2, ids.expand(p.shape[0], nv), k, ids_ascending=True)
        out_i.append(i)
        out_d.append(d)
    if not out_i:
        return points.new_zeros((0, k), dtype=torch.int64), points.new_zeros((0, k))
    return torch.cat(out_i), torch.cat(out_d)


# --- dispatch --------------------------------------------------------------------------------------

def build_knn_grid(verts: torch.Tensor, spec: KnnGridSpec = KnnGridSpec()) -> KnnGrid:
    """Build the search grid of ``verts (V, 3)`` (float32/float64, V >= 1): per cell the K'
    vertices nearest to its centre (exact). Native kernels when available, else the reference."""
    ext = _native.extension_for(verts)
    if ext is None:
        return build_knn_grid_reference(verts, spec)
    lo, cell = knn_grid_frame(verts, spec)
    cand = ext.knn_build(verts.detach().contiguous(), [float(x) for x in lo.tolist()], cell, spec.resolution,
                         spec.candidates)
    return KnnGrid(lo=lo, cell=cell, resolution=spec.resolution, candidates=cand, num_verts=verts.shape[0])


def knn_query(points: torch.Tensor, verts: torch.Tensor, grid: KnnGrid,
              k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest of ``verts`` to each of ``points (N, 3)`` among the candidates of the
    point's cell of ``grid`` (built from these ``verts``): ``(indices (N, k) int64, dist2 (N, k))``,
    nearest first. Approximate (see the module docstring); native kernels when available."""
    ext = _native.extension_for(points, verts)
    if ext is None:
        return knn_query_reference(points, verts, grid, k)
    _check_query(points, verts, grid, k)
    idx, d2 = ext.knn_query(points.detach().contiguous(), verts.detach().contiguous(), list(grid.lo_values),
                            1.0 / grid.cell, grid.resolution, grid.candidates.contiguous(), k)
    return idx, d2


def knn_brute(points: torch.Tensor, verts: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact ``k`` nearest of ``verts (V, 3)`` to each of ``points (N, 3)``, by brute force:
    ``(indices (N, k) int64, dist2 (N, k))``, nearest first. Native kernels when available."""
    ext = _native.extension_for(points, verts)
    if ext is None:
        return knn_brute_reference(points, verts, k)
    _check_points_verts(points, verts, k)
    idx, d2 = ext.knn_brute(points.detach().contiguous(), verts.detach().contiguous(), k)
    return idx, d2

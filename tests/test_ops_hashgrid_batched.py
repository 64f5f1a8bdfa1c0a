"""Batched hash grids (talkcli.ops.hashgrid_batched): native kernels against the PyTorch reference
(values and gradients to x and to the tables), against a per-grid encoding written here from
hashspec alone, gradcheck in float64, level mask and edge cases."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from talkcli.ops import hashspec, use_backend
from talkcli.ops.hashgrid_batched import (MONOAVATAR_SPEC, BatchedHashGrids, batched_hash_encode,
                                          batched_hash_encode_reference)
from talkcli.ops.hashspec import HashGridSpec

KERNELS = Path(__file__).resolve().parents[1] / "kernels"

# F=4: the MonoAvatar++ grids (2 hashed levels); F=2: dense and hashed levels mixed.
SPEC4 = MONOAVATAR_SPEC
SPEC2 = HashGridSpec(dims=3, levels=3, features=2, log2_table=9, base_resolution=4.0, finest_resolution=24.0)
SPEC_2D = HashGridSpec(dims=2, levels=3, features=4, log2_table=7, base_resolution=5.0, finest_resolution=40.0)
# Tiny grids for gradcheck (one numerical derivative per table entry): a dense and a hashed level.
GC_SPEC4 = HashGridSpec(dims=3, levels=2, features=4, log2_table=4, base_resolution=2.0, finest_resolution=6.0)
GC_SPEC2 = HashGridSpec(dims=3, levels=3, features=2, log2_table=5, base_resolution=2.0, finest_resolution=9.0)


def make_inputs(q: int, v: int, m: int, spec: HashGridSpec, seed: int, dtype=torch.float32, used=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(q, spec.dims, generator=gen, dtype=torch.float64).to(dtype)
    ids = torch.arange(v) if used is None else torch.as_tensor(used)
    item = ids[torch.randint(0, len(ids), (q,), generator=gen)]
    tables = torch.randn(v, m, spec.n_entries, spec.features, generator=gen, dtype=torch.float64).to(dtype)
    return x, item, tables


def run(backend: str, x, item, tables, spec, level_mask=None, grad_seed: int = 0):
    """Output and gradients (dx, dtables) for a random output gradient."""
    x = x.clone().requires_grad_(True)
    tables = tables.clone().requires_grad_(True)
    with use_backend(backend):
        out = batched_hash_encode(x, item, tables, spec, level_mask)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype)
    dx, dt = torch.autograd.grad(out, (x, tables), g)
    return out.detach(), dx, dt


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str) -> None:
    scale = max(b.abs().max().item(), 1.0) if b.numel() else 1.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    assert err <= rtol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def single_grid_encode(x: torch.Tensor, table: torch.Tensor, spec: HashGridSpec) -> torch.Tensor:
    """Hash encoding of points x (N, D) by ONE grid's table (S, F), written from hashspec directly
    (corner by corner): the per-grid definition that the batched op applies to each item."""
    feats = []
    for lv in range(spec.levels):
        cell, frac = hashspec.pos_fract(x, float(spec.scales[lv]))
        acc = torch.zeros(x.shape[0], spec.features, dtype=x.dtype)
        for c in range(1 << spec.dims):
            bit = torch.tensor([(c >> d) & 1 for d in range(spec.dims)])
            w = torch.ones(x.shape[0], dtype=x.dtype)
            for d in range(spec.dims):
                w = w * (frac[:, d] if bit[d] else 1 - frac[:, d])
            idx = hashspec.grid_index(cell + bit, int(spec.resolutions[lv]), int(spec.sizes[lv]), bool(spec.hashed[lv]))
            acc = acc + w[:, None] * table[int(spec.offsets[lv]) + idx]
        feats.append(acc)
    return torch.cat(feats, dim=1)


def off_boundary_points(n: int, spec: HashGridSpec, seed: int, margin: float = 0.05) -> torch.Tensor:
    """float64 points whose fraction inside the cell is in [margin, 1 - margin] on every level
    (finite differences then never cross a cell boundary)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < n:
        p = torch.rand(1, spec.dims, generator=gen, dtype=torch.float64)
        fr = [hashspec.pos_fract(p, float(s))[1] for s in spec.scales]
        if all(((f > margin) & (f < 1 - margin)).all() for f in fr):
            out.append(p)
    return torch.cat(out)


# --------------------------------------------------------------------------- native == reference

@pytest.mark.parametrize("spec,m", [(SPEC4, 3), (SPEC4, 5), (SPEC2, 3), (SPEC2, 5), (SPEC_2D, 2)])
@pytest.mark.parametrize("masked", [False, True])
def test_native_matches_reference(ext, spec, m, masked):
    x, item, tables = make_inputs(997, 13, m, spec, seed=1 + m + spec.features)
    mask = None
    if masked:
        mask = torch.ones(spec.levels, dtype=torch.bool)
        mask[1] = False
    out_n, dx_n, dt_n = run("native", x, item, tables, spec, mask)
    out_r, dx_r, dt_r = run("reference", x, item, tables, spec, mask)
    assert out_n.shape == (997, m, spec.levels * spec.features)
    assert_close_rel(out_n, out_r, 1e-5, "output")
    assert_close_rel(dt_n, dt_r, 1e-5, "dtables")
    assert_close_rel(dx_n, dx_r, 1e-4, "dx")
    if masked:
        f = spec.features
        assert (out_n[:, :, f:2 * f] == 0).all()
        lv = slice(int(spec.offsets[1]), int(spec.offsets[2]))
        assert (dt_n[:, :, lv] == 0).all() and (dt_r[:, :, lv] == 0).all()
        assert dt_n[:, :, :int(spec.offsets[1])].abs().sum() > 0


def test_native_matches_reference_float64(ext):
    x, item, tables = make_inputs(301, 7, 2, SPEC2, seed=3, dtype=torch.float64)
    out_n, dx_n, dt_n = run("native", x, item, tables, SPEC2)
    out_r, dx_r, dt_r = run("reference", x, item, tables, SPEC2)
    assert out_n.dtype == torch.float64
    assert_close_rel(out_n, out_r, 1e-12, "output")
    assert_close_rel(dt_n, dt_r, 1e-12, "dtables")
    assert_close_rel(dx_n, dx_r, 1e-11, "dx")


def test_one_gradient_only(ext):
    """Frozen tables (dx only) and fixed points (dtables only) take their own kernel paths."""
    x, item, tables = make_inputs(211, 5, 3, SPEC4, seed=4)
    g = torch.randn(211, 3, SPEC4.output_dim, generator=torch.Generator().manual_seed(5))
    for backend in ("native", "reference"):
        with use_backend(backend):
            xr = x.clone().requires_grad_(True)
            (dx,) = torch.autograd.grad(batched_hash_encode(xr, item, tables, SPEC4), xr, g)
            tr = tables.clone().requires_grad_(True)
            (dt,) = torch.autograd.grad(batched_hash_encode(x, item, tr, SPEC4), tr, g)
        if backend == "native":
            dx_n, dt_n = dx, dt
    assert_close_rel(dx_n, dx, 1e-4, "dx")
    assert_close_rel(dt_n, dt, 1e-5, "dtables")


def test_unused_items_get_zero_gradient(ext):
    used = [0, 2, 3, 7, 11]
    x, item, tables = make_inputs(997, 13, 5, SPEC4, seed=6, used=used)
    for backend in ("native", "reference"):
        _, _, dt = run(backend, x, item, tables, SPEC4)
        unused = [v for v in range(13) if v not in used]
        assert (dt[unused] == 0).all(), backend
        assert all(dt[v].abs().sum() > 0 for v in used), backend


def test_sorted_and_clustered_items(ext):
    """Item ids sorted (spatially coherent neighbours) or all one item: same values as random."""
    x, item, tables = make_inputs(997, 13, 3, SPEC4, seed=7)
    for ids in (item.sort().values, torch.full_like(item, 12)):
        out_n, dx_n, dt_n = run("native", x, ids, tables, SPEC4)
        out_r, dx_r, dt_r = run("reference", x, ids, tables, SPEC4)
        assert_close_rel(out_n, out_r, 1e-5, "output")
        assert_close_rel(dt_n, dt_r, 1e-5, "dtables")
        assert_close_rel(dx_n, dx_r, 1e-4, "dx")


@pytest.mark.parametrize("spec", [SPEC4, SPEC2])
def test_one_query_per_item_is_the_single_grid_encoding(ext, spec):
    v, m = 6, 3
    x, _, tables = make_inputs(v, v, m, spec, seed=8)
    item = torch.randperm(v, generator=torch.Generator().manual_seed(9))
    want = torch.stack([torch.stack([single_grid_encode(x[q:q + 1], tables[item[q], g], spec)[0] for g in range(m)])
                        for q in range(v)])
    for backend in ("native", "reference"):
        with use_backend(backend):
            got = batched_hash_encode(x, item, tables, spec)
        assert_close_rel(got, want, 1e-6, backend)


def test_points_outside_the_unit_cube(ext):
    """Coordinates outside [0, 1] (negative cells too) index like tiny-cuda-nn: modulo the table."""
    x, item, tables = make_inputs(257, 5, 2, SPEC2, seed=10)
    x = x * 3 - 1  # [-1, 2]
    out_n, dx_n, dt_n = run("native", x, item, tables, SPEC2)
    out_r, dx_r, dt_r = run("reference", x, item, tables, SPEC2)
    assert torch.isfinite(out_n).all()
    assert_close_rel(out_n, out_r, 1e-5, "output")
    assert_close_rel(dt_n, dt_r, 1e-5, "dtables")
    assert_close_rel(dx_n, dx_r, 1e-4, "dx")


# --------------------------------------------------------------------------- gradcheck (float64)

@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("spec", [GC_SPEC4, GC_SPEC2])
def test_gradcheck(ext, backend, spec):
    assert not spec.hashed[0] and spec.hashed[-1]
    x = off_boundary_points(4, spec, seed=11).requires_grad_(True)
    item = torch.tensor([2, 0, 2, 1])
    tables = torch.randn(3, 2, spec.n_entries, spec.features, generator=torch.Generator().manual_seed(12),
                         dtype=torch.float64).requires_grad_(True)
    mask = torch.tensor([True] * (spec.levels - 1) + [False])
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, t: batched_hash_encode(a, item, t, spec), (x, tables),
                                        eps=1e-6, atol=1e-6, rtol=1e-4)
        assert torch.autograd.gradcheck(lambda a, t: batched_hash_encode(a, item, t, spec, mask), (x, tables),
                                        eps=1e-6, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------- edge cases

@pytest.mark.parametrize("backend", ["native", "reference"])
def test_empty_queries(ext, backend):
    x = torch.zeros(0, 3, requires_grad=True)
    item = torch.zeros(0, dtype=torch.int64)
    tables = torch.randn(4, 5, SPEC4.n_entries, 4, requires_grad=True)
    with use_backend(backend):
        out = batched_hash_encode(x, item, tables, SPEC4)
    assert out.shape == (0, 5, 8)
    dx, dt = torch.autograd.grad(out.sum(), (x, tables), allow_unused=True)
    assert dt is None or (dt == 0).all()
    assert dx is None or dx.shape == (0, 3)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_item_out_of_range(ext, backend):
    x, item, tables = make_inputs(50, 4, 2, SPEC4, seed=13)
    for bad in (4, -1):
        item2 = item.clone()
        item2[17] = bad
        with use_backend(backend), pytest.raises(ValueError, match=r"\[0, 4\)"):
            batched_hash_encode(x, item2, tables, SPEC4)


def test_native_entry_points(ext):
    """The extension's unsorted forward path and its guards on a sort passed from Python."""
    from talkcli.ops.hashgrid_batched import _level_args

    x, item, tables = make_inputs(333, 9, 2, SPEC2, seed=14)
    la = _level_args(SPEC2).as_tuple()
    want = batched_hash_encode_reference(x, item, tables, SPEC2)
    order, start = ext.hashgrid_batched_sort(item, 9)
    assert torch.equal(item[order], item.sort(stable=True).values)
    counts = torch.bincount(item, minlength=9)
    assert torch.equal(start, torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))
    assert_close_rel(ext.hashgrid_batched_forward(x, item, tables, *la), want, 1e-5, "unsorted forward")
    assert_close_rel(ext.hashgrid_batched_forward(x, item, tables, *la, order=order, start=start), want, 1e-5, "sorted")
    other = int((item[order] != item[order[0]]).nonzero()[0])  # a query of another item
    for bad in ([0, other], [other, 0]), ([1], [0]):  # queries in the wrong bucket; one twice
        bad_order = order.clone()
        bad_order[bad[0]] = order[bad[1]]
        with pytest.raises(RuntimeError, match="not the sort"):
            ext.hashgrid_batched_forward(x, item, tables, *la, order=bad_order, start=start)
    with pytest.raises(RuntimeError, match="both order and start"):
        ext.hashgrid_batched_forward(x, item, tables, *la, order=order)
    with pytest.raises(ValueError, match="outside"):
        ext.hashgrid_batched_forward(x, item + 9, tables, *la)


def test_bad_shapes():
    x, item, tables = make_inputs(10, 3, 2, SPEC4, seed=15)
    with use_backend("reference"):
        with pytest.raises(ValueError, match="x must be"):
            batched_hash_encode(x[:, :2], item, tables, SPEC4)
        with pytest.raises(ValueError, match="tables must be"):
            batched_hash_encode(x, item, tables[:, :, :100], SPEC4)
        with pytest.raises(ValueError, match="level_mask"):
            batched_hash_encode(x, item, tables, SPEC4, [True])


def test_module(ext):
    torch.manual_seed(16)
    grids = BatchedHashGrids(n_items=7, n_grids=5, spec=SPEC4, init_scale=1e-3)
    assert grids.tables.shape == (7, 5, 512, 4) and grids.output_dim == 8
    assert grids.tables.abs().max() <= 1e-3 and grids.tables.abs().max() > 0
    x, item, _ = make_inputs(64, 7, 5, SPEC4, seed=17)
    out = grids(x, item, level_mask=[True, False])
    assert out.shape == (64, 5, 8) and (out[..., 4:] == 0).all()
    out.square().sum().backward()
    assert grids.tables.grad is not None and grids.tables.grad[:, :, 256:].abs().sum() == 0
    assert "items=7" in repr(grids)


def test_cuda_kernel_compiles(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    for arch in ([], ["-arch=sm_80"]):
        out = tmp_path / "hashgrid_batched.o"
        proc = subprocess.run([nvcc, "-std=c++17", "-O3", *arch, "-I", str(KERNELS), "-c",
                               str(KERNELS / "cuda" / "hashgrid_batched.cu"), "-o", str(out)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert out.stat().st_size > 0


def test_cuda_matches_cpu(cuda_ext):
    for spec, dtype in ((SPEC4, torch.float32), (SPEC2, torch.float64)):
        x, item, tables = make_inputs(997, 13, 3, spec, seed=18, dtype=dtype)
        mask = torch.tensor([True, False] + [True] * (spec.levels - 2))
        cpu = run("native", x, item, tables, spec, mask)
        gpu = run("native", x.cuda(), item.cuda(), tables.cuda(), spec, mask.cuda())
        for a, b, what in zip(gpu, cpu, ("output", "dx", "dtables")):
            assert_close_rel(a.cpu(), b, 1e-4 if dtype == torch.float32 else 1e-10, what)

"""Multi-resolution hash encoding: native kernels (kernels/*/hashgrid*) against the PyTorch reference."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from talkcli.ops import use_backend
from talkcli.ops.hashgrid import HashGrid, hash_encode, hash_encode_reference
from talkcli.ops.hashspec import HashGridSpec, pos_fract

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def small_spec(dims: int, features: int, levels: int = 6) -> HashGridSpec:
    """Coarse levels dense, fine levels hashed (both kinds in one table)."""
    spec = HashGridSpec(dims=dims, levels=levels, features=features, log2_table=10 if dims == 2 else 9,
                        base_resolution=3, finest_resolution=200)
    assert spec.hashed.any() and not spec.hashed.all()
    return spec


def rand_table(spec: HashGridSpec, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    return (torch.rand(spec.n_entries, spec.features, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)


def run(backend: str, x, table, spec, mask, w):
    """Output and gradients (table, x) of sum(encoding * w) under one backend."""
    x = x.detach().clone().requires_grad_()
    table = table.detach().clone().requires_grad_()
    with use_backend(backend):
        out = hash_encode(x, table, spec, mask)
    (out * w).sum().backward()
    return out.detach(), table.grad, x.grad


def assert_close(a, b, tol=1e-5):
    scale = max(float(b.abs().max()), 1.0) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("features", [2, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_native_equals_reference(ext, dims, features, masked):
    gen = torch.Generator().manual_seed(100 * dims + features + masked)
    spec = small_spec(dims, features)
    x = torch.rand(1001, dims, generator=gen)
    table = rand_table(spec, gen)
    w = torch.randn(1001, spec.output_dim, generator=gen)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool) if masked else None
    out_n, gt_n, gx_n = run("native", x, table, spec, mask, w)
    out_r, gt_r, gx_r = run("reference", x, table, spec, mask, w)
    assert out_n.shape == (1001, spec.output_dim)
    assert_close(out_n, out_r)
    assert_close(gt_n, gt_r)
    assert_close(gx_n, gx_r, tol=1e-4)
    if masked:
        off = spec.offsets
        for level in (1, 4):
            assert out_n[:, level * features:(level + 1) * features].abs().max() == 0
            assert gt_n[int(off[level]):int(off[level + 1])].abs().max() == 0
        assert gx_n.abs().max() > 0  # the active levels still give an input gradient


def test_all_levels_masked(ext):
    gen = torch.Generator().manual_seed(5)
    spec = small_spec(3, 2)
    x = torch.rand(37, 3, generator=gen)
    w = torch.randn(37, spec.output_dim, generator=gen)
    out, gt, gx = run("native", x, rand_table(spec, gen), spec, torch.zeros(spec.levels, dtype=torch.uint8), w)
    assert out.abs().max() == 0 and gt.abs().max() == 0 and gx.abs().max() == 0


@pytest.mark.parametrize("dims", [2, 3])
def test_out_of_range_points_wrap_like_the_reference(ext, dims):
    gen = torch.Generator().manual_seed(7 + dims)
    spec = small_spec(dims, 2)
    x = torch.rand(513, dims, generator=gen) * 7 - 3  # [-3, 4): negative cells, indices past the grid
    x[:4] = torch.tensor([0.0, 1.0, -1.0, 1e-8])[:, None]  # exact edges
    table = rand_table(spec, gen)
    w = torch.randn(513, spec.output_dim, generator=gen)
    out_n, gt_n, gx_n = run("native", x, table, spec, None, w)
    out_r, gt_r, gx_r = run("reference", x, table, spec, None, w)
    assert_close(out_n, out_r)
    assert_close(gt_n, gt_r)
    assert_close(gx_n, gx_r, tol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
def test_float64_all_feature_counts(ext, dims):
    gen = torch.Generator().manual_seed(11 + dims)
    for features in (1, 2, 4, 8):
        spec = small_spec(dims, features, levels=4)
        x = torch.rand(333, dims, generator=gen, dtype=torch.float64)
        table = rand_table(spec, gen, torch.float64)
        w = torch.randn(333, spec.output_dim, generator=gen, dtype=torch.float64)
        out_n, gt_n, gx_n = run("native", x, table, spec, None, w)
        out_r, gt_r, gx_r = run("reference", x, table, spec, None, w)
        assert out_n.dtype == torch.float64
        assert_close(out_n, out_r, tol=1e-12)
        assert_close(gt_n, gt_r, tol=1e-12)
        assert_close(gx_n, gx_r, tol=1e-10)


@pytest.mark.parametrize("dims", [2, 3])
def test_float32_features_1_8(ext, dims):
    gen = torch.Generator().manual_seed(21 + dims)
    for features in (1, 8):
        spec = small_spec(dims, features, levels=4)
        x = torch.rand(77, dims, generator=gen)
        table = rand_table(spec, gen)
        w = torch.randn(77, spec.output_dim, generator=gen)
        for a, b in zip(run("native", x, table, spec, None, w), run("reference", x, table, spec, None, w)):
            assert_close(a, b, tol=1e-4)


def away_from_cell_edges(spec: HashGridSpec, n: int, gen: torch.Generator, margin: float = 1e-3) -> torch.Tensor:
    """Points whose fraction on every level is at least `margin` from 0 and 1 (the encoding is only
    piecewise smooth, so finite differences across a cell edge are meaningless)."""
    pts = []
    while len(pts) < n:
        x = torch.rand(1, spec.dims, generator=gen, dtype=torch.float64)
        if all(((f > margin) & (f < 1 - margin)).all() for f in
               (pos_fract(x, float(s))[1] for s in spec.scales)):
            pts.append(x)
    return torch.cat(pts)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("dims", [2, 3])
def test_gradcheck(backend, dims, request):
    if backend == "native":
        request.getfixturevalue("ext")
    gen = torch.Generator().manual_seed(3 + dims)
    spec = HashGridSpec(dims=dims, levels=3, features=2, log2_table=5, base_resolution=2, finest_resolution=9)
    assert spec.hashed.any() and not spec.hashed.all()
    x = away_from_cell_edges(spec, 5, gen).requires_grad_()
    table = rand_table(spec, gen, torch.float64).requires_grad_()
    mask = torch.tensor([True, False, True])
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b: hash_encode(a, b, spec), (x, table))
        assert torch.autograd.gradcheck(lambda a, b: hash_encode(a, b, spec, mask), (x, table))
        # x alone / table alone (the backward computes only what is asked for)
        assert torch.autograd.gradcheck(lambda a: hash_encode(a, table.detach(), spec), (x,))
        assert torch.autograd.gradcheck(lambda b: hash_encode(x.detach(), b, spec), (table,))


def test_empty_input(ext):
    spec = small_spec(3, 2)
    gen = torch.Generator().manual_seed(1)
    for backend in ("native", "reference"):
        out, gt, gx = run(backend, torch.zeros(0, 3), rand_table(spec, gen), spec, None,
                          torch.zeros(0, spec.output_dim))
        assert out.shape == (0, spec.output_dim)
        assert gt.shape == (spec.n_entries, 2) and gt.abs().max() == 0
        assert gx.shape == (0, 3)


def test_leading_dims_dtype_and_layout(ext):
    gen = torch.Generator().manual_seed(2)
    spec = small_spec(3, 2)
    table = rand_table(spec, gen)
    x = torch.rand(3, 3, 40, generator=gen).transpose(1, 2)  # (3, 40, 3), not contiguous
    with use_backend("native"):
        out = hash_encode(x, table, spec)
        out64 = hash_encode(x.double(), table, spec)  # points are cast to the table's dtype
    assert out.shape == (3, 40, spec.output_dim)
    assert_close(out, hash_encode_reference(x, table, spec))
    assert out64.dtype == torch.float32
    with pytest.raises(ValueError, match="coordinates"):
        hash_encode(torch.rand(4, 2), table, spec)
    with pytest.raises(ValueError, match="table must have shape"):
        hash_encode(torch.rand(4, 3), table[:-1], spec)
    with pytest.raises(ValueError, match="level_mask"):
        hash_encode(torch.rand(4, 3), table, spec, torch.ones(spec.levels + 1, dtype=torch.bool))


def test_native_wrapper_rejects_bad_level_geometry(ext):
    spec = small_spec(3, 2)
    t = spec.level_tensors("cpu")
    table = torch.zeros(spec.n_entries - 1, 2)  # the last level does not fit
    with pytest.raises(RuntimeError, match="does not fit"):
        ext.hashgrid_forward(torch.rand(4, 3), table, t["scales"], t["resolutions"], t["sizes"], t["offsets"],
                             t["hashed"], None)


def test_module(ext):
    torch.manual_seed(0)
    spec = HashGridSpec(dims=3, levels=8, features=4, log2_table=12, base_resolution=8, finest_resolution=256)
    grid = HashGrid(spec, init_scale=1e-2)
    assert grid.output_dim == 32
    assert grid.table.shape == (spec.n_entries, 4) and grid.table.abs().max() <= 1e-2
    x = torch.rand(100, 3, requires_grad=True)
    out = grid(x, level_mask=torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool))
    assert out.shape == (100, 32) and out[:, 16:].abs().max() == 0
    out.square().sum().backward()
    assert grid.table.grad is not None and grid.table.grad.abs().max() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert "levels=8" in repr(grid)


@pytest.mark.parametrize("arch", [None, "sm_80"])
def test_cuda_kernel_compiles(tmp_path, arch):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    cmd = [nvcc, "-std=c++17", "-O3", "-I", str(KERNELS), "-c", str(KERNELS / "cuda" / "hashgrid.cu"),
           "-o", str(tmp_path / "hashgrid.o")]
    if arch:
        cmd[1:1] = [f"-arch={arch}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

"""Occupancy grid + ray marching: the native kernels against the PyTorch reference (same samples
bit for bit), the grid's update / pack semantics, gradients to the rays, and edge cases."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from talkcli.errors import NotAvailable
from talkcli.ops import _native, use_backend
from talkcli.ops import raymarch as rm

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


@pytest.fixture(scope="module")
def native():
    try:
        return _native.load("cpu")
    except NotAvailable as exc:
        pytest.skip(f"native kernels unavailable: {exc}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_grid(resolution: int, fraction: float, seed: int, aabb=(-1.0, -0.8, -1.2, 1.1, 0.9, 1.0)) -> rm.OccupancyGrid:
    g = _gen(seed)
    grid = rm.OccupancyGrid(rm.OccupancySpec(resolution=resolution, aabb=aabb))
    grid.density.copy_((torch.rand(grid.density.shape, generator=g) < fraction).float())
    grid.pack()
    return grid


def _sphere_grid(resolution: int, radius: float) -> rm.OccupancyGrid:
    grid = rm.OccupancyGrid(rm.OccupancySpec(resolution=resolution))
    c = (torch.arange(resolution) + 0.5) / resolution * 2 - 1
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    grid.density.copy_(((x * x + y * y + z * z) <= radius * radius).float())
    grid.pack()
    return grid


def _random_rays(n: int, seed: int, dtype=torch.float32, spread: float = 2.0):
    g = _gen(seed)
    o = (torch.rand(n, 3, generator=g) - 0.5) * 2 * spread
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    return o.to(dtype), d.to(dtype)


def _camera_rays(n_side: int, distance: float = 2.5, dtype=torch.float32):
    cam = torch.tensor([0.9, 0.6, 2.26])
    cam = cam / cam.norm() * distance
    fwd = -cam / cam.norm()
    right = torch.nn.functional.normalize(torch.linalg.cross(fwd, torch.tensor([0.0, 1.0, 0.0])), dim=0)
    up = torch.linalg.cross(right, fwd)
    s = (torch.arange(n_side) + 0.5) / n_side * 2 - 1
    v, u = torch.meshgrid(s, s, indexing="ij")
    spread = 1.25 / distance  # the fan covers about the box
    d = fwd + spread * (u.reshape(-1, 1) * right + v.reshape(-1, 1) * up)
    d = torch.nn.functional.normalize(d, dim=-1)
    return cam.expand_as(d).contiguous().to(dtype), d.to(dtype)


def _both(fn):
    with use_backend("reference"):
        a = fn()
    with use_backend("native"):
        b = fn()
    return a, b


def _assert_same_samples(a: rm.RaySamples, b: rm.RaySamples) -> None:
    assert torch.equal(a.ray_offsets, b.ray_offsets)
    assert torch.equal(a.ray_indices, b.ray_indices)
    # Same arithmetic in the same order: equal bit for bit (allclose would hide a lattice shift).
    torch.testing.assert_close(b.ts, a.ts, rtol=0, atol=0)
    torch.testing.assert_close(b.positions, a.positions, rtol=0, atol=0)
    torch.testing.assert_close(b.deltas, a.deltas, rtol=0, atol=0)
    torch.testing.assert_close(b.directions, a.directions, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# ray_aabb
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ray_aabb_native_matches_reference(native, dtype):
    o, d = _random_rays(301, 1, dtype, spread=3.0)
    d[::7, 0] = 0  # parallel to the x slabs
    d[::11, 1:] = 0  # along x only
    box = (-1.0, -0.8, -1.2, 1.1, 0.9, 1.0)
    (n0, f0), (n1, f1) = _both(lambda: rm.ray_aabb(o, d, box, min_near=0.05))
    torch.testing.assert_close(n1, n0, rtol=0, atol=0)
    torch.testing.assert_close(f1, f0, rtol=0, atol=0)
    assert (f0 >= n0).all() and (n0 >= 0.05).all()


def test_ray_aabb_geometry():
    o = torch.tensor([[0.0, 0.0, -3.0], [0.0, 5.0, -3.0], [0.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    d = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    for backend in ("reference", "native"):
        with use_backend(backend):
            try:
                near, far = rm.ray_aabb(o, d, (-1, -1, -1, 1, 1, 1))
            except NotAvailable:
                continue
        # through the box; misses (near = far = min_near); starts inside; box behind the ray
        assert near.tolist() == [2.0, 0.0, 0.0, 0.0]
        assert far.tolist() == [4.0, 0.0, 1.0, 0.0]


# ------------------------------------------------------------------------------------------------
# march_rays: native == reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cone_angle,max_step", [(0.0, None), (0.02, 0.09)])
def test_march_native_matches_reference(native, dtype, cone_angle, max_step):
    grid = _random_grid(37, 0.3, seed=2)
    o, d = _random_rays(333, 3, dtype)
    jitter = torch.rand(333, generator=_gen(4)).to(dtype)
    near, far = rm.ray_aabb(o, d, grid, min_near=0.1)
    a, b = _both(lambda: rm.march_rays(o, d, near, far, grid, 0.013, 1000, cone_angle, max_step, jitter))
    _assert_same_samples(a, b)
    assert a.num_samples > 1000
    assert a.ray_indices.dtype == torch.int64 and a.ray_offsets.shape == (334,)
    assert a.positions.dtype == dtype and a.ts.dtype == dtype


def test_march_camera_fan_sparse_and_dense(native):
    o, d = _camera_rays(23)
    for grid in (_sphere_grid(64, 0.5), _random_grid(64, 0.02, seed=5, aabb=(-1, -1, -1, 1, 1, 1))):
        near, far = rm.ray_aabb(o, d, grid)
        a, b = _both(lambda: rm.march_rays(o, d, near, far, grid, math.sqrt(3) * 2 / 512, 1024))
        _assert_same_samples(a, b)
        assert a.num_samples > 1000


def test_march_far_camera_small_steps(native):
    """Long empty stretches at large t (the native lattice jumps) and cone-angle steps."""
    grid = _sphere_grid(31, 0.4)
    for distance, cone in ((40.0, 0.0), (150.0, 0.002)):
        o, d = _camera_rays(15, distance=distance)
        near, far = rm.ray_aabb(o, d, grid)
        a, b = _both(lambda: rm.march_rays(o, d, near, far, grid, 0.002, 100000, cone, 0.01))
        _assert_same_samples(a, b)
        assert a.num_samples > 1000


def test_march_ranges_not_from_the_box(native):
    """Rays starting inside the box, ranges reaching outside it, near > far, rays that miss."""
    grid = _random_grid(37, 0.4, seed=6)
    o, d = _random_rays(257, 7, spread=0.9)
    g = _gen(8)
    near = torch.rand(257, generator=g) * 3 - 1.5
    far = near + torch.rand(257, generator=g) * 5 - 1.0  # about one in five with near > far
    miss_o = torch.tensor([[5.0, 5.0, 5.0]]).expand(5, 3)
    miss_d = torch.tensor([[1.0, 0.0, 0.0]]).expand(5, 3)
    o, d = torch.cat([o, miss_o]), torch.cat([d, miss_d])
    near, far = torch.cat([near, torch.zeros(5)]), torch.cat([far, torch.full((5,), 10.0)])
    jitter = torch.rand(262, generator=g)
    a, b = _both(lambda: rm.march_rays(o, d, near, far, grid, 0.01, 500, jitter=jitter))
    _assert_same_samples(a, b)
    counts = a.counts()
    assert (counts[far <= near] == 0).all()
    assert (counts[-5:] == 0).all()
    assert counts.sum() > 500
    # samples stay inside the box and in [near, far)
    lo, hi = torch.tensor(grid.spec.aabb_min), torch.tensor(grid.spec.aabb_max)
    assert ((a.positions >= lo - 1e-6) & (a.positions <= hi + 1e-6)).all()
    assert (a.ts >= near[a.ray_indices]).all() and (a.ts < far[a.ray_indices]).all()


def test_march_max_samples_cap(native):
    grid = _random_grid(37, 0.9, seed=9)
    o, d = _random_rays(99, 10)
    near, far = rm.ray_aabb(o, d, grid)
    full = rm.march_rays(o, d, near, far, grid, 0.01, 10000)
    a, b = _both(lambda: rm.march_rays(o, d, near, far, grid, 0.01, 17))
    _assert_same_samples(a, b)
    counts, full_counts = a.counts(), full.counts()
    assert counts.max() == 17 and (full_counts > 17).any()
    assert torch.equal(counts, full_counts.clamp(max=17))
    for r in range(0, 99, 7):  # the cap keeps the first samples
        s, e = int(a.ray_offsets[r]), int(a.ray_offsets[r + 1])
        fs = int(full.ray_offsets[r])
        assert torch.equal(a.ts[s:e], full.ts[fs:fs + e - s])


def test_march_lattice_and_deltas():
    """Reference semantics: samples sit on t_0 = near + jitter dt, t += dt(t); deltas = dt(t)."""
    grid = rm.OccupancyGrid(rm.OccupancySpec(resolution=8))  # all occupied
    o = torch.tensor([[0.0, 0.0, -3.0]])
    d = torch.tensor([[0.0, 0.0, 1.0]])
    near, far = rm.ray_aabb(o, d, grid)
    s = rm.march_rays(o, d, near, far, grid, 0.1, 1000, cone_angle=0.05, max_step=0.15,
                      jitter=torch.tensor([0.5]))
    t = 2.0 + 0.5 * 0.1
    expected = []
    while t < 4.0:
        expected.append(t)
        t += min(max(t * 0.05, 0.1), 0.15)
    torch.testing.assert_close(s.ts, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.deltas, (s.ts * 0.05).clamp(0.1, 0.15))
    torch.testing.assert_close(s.positions, o + s.ts[:, None] * d)


def test_empty_space_skipping_is_exact(native):
    """Sphere occupancy: every native sample lies in an occupied cell, and none of the lattice
    points in occupied cells is missed (brute-force enumeration of the whole lattice)."""
    grid = _sphere_grid(48, 0.5)
    o, d = _camera_rays(21)
    near, far = rm.ray_aabb(o, d, grid)
    step = 0.004
    jitter = torch.rand(o.shape[0], generator=_gen(11))
    with use_backend("native"):
        s = rm.march_rays(o, d, near, far, grid, step, 100000, jitter=jitter)
    assert s.num_samples > 1000
    assert grid.is_occupied(s.positions).all()
    # brute force: all lattice points of every ray, occupied ones kept
    t = near + jitter * step
    all_t, all_r = [], []
    while True:
        live = t < far
        if not live.any():
            break
        all_t.append(t.masked_select(live))
        all_r.append(torch.nonzero(live).squeeze(1))
        t = t + step
    all_t, all_r = torch.cat(all_t), torch.cat(all_r)
    pts = o.index_select(0, all_r) + all_t[:, None] * d.index_select(0, all_r)
    keep = grid.is_occupied(pts)
    assert int(keep.sum()) == s.num_samples
    assert torch.equal(torch.bincount(all_r[keep], minlength=o.shape[0]), s.counts())
    # and most of the lattice was empty: skipping had something to skip
    assert keep.float().mean() < 0.5


def test_march_empty_inputs(native):
    grid = _random_grid(9, 0.5, seed=12)
    o = torch.zeros(0, 3)
    for backend in ("reference", "native"):
        with use_backend(backend):
            near, far = rm.ray_aabb(o, o, grid)
            s = rm.march_rays(o, o, near, far, grid, 0.01, 10)
        assert s.num_samples == 0 and s.num_rays == 0 and s.ray_offsets.tolist() == [0]
        assert s.positions.shape == (0, 3)
    # rays but an empty grid: no samples at all
    empty = rm.OccupancyGrid(rm.OccupancySpec(resolution=9))
    empty.pack()  # zero densities: nothing occupied
    assert empty.occupied_fraction() == 0.0
    o, d = _random_rays(50, 13)
    near, far = rm.ray_aabb(o, d, empty)
    a, b = _both(lambda: rm.march_rays(o, d, near, far, empty, 0.01, 10))
    _assert_same_samples(a, b)
    assert a.num_samples == 0 and a.ray_offsets.shape == (51,)


def test_march_argument_checks():
    grid = _random_grid(5, 0.5, seed=14)
    o, d = _random_rays(4, 15)
    near, far = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError):
        rm.march_rays(o, d, near, far, grid, 0.0, 10)
    with pytest.raises(ValueError):
        rm.march_rays(o, d, near, far, grid, 0.1, 0)
    with pytest.raises(ValueError):
        rm.march_rays(o, d, near, far, grid, 0.1, 10, cone_angle=0.1, max_step=0.05)
    with pytest.raises(ValueError):
        rm.march_rays(o, d[:3], near, far, grid, 0.1, 10)
    with pytest.raises(ValueError):
        rm.march_rays(o.half(), d.half(), near, far, grid, 0.1, 10)
    with pytest.raises(ValueError):
        rm.OccupancySpec(resolution=0)
    with pytest.raises(ValueError):
        rm.OccupancySpec(aabb=(0, 0, 0, 1, -1, 1))
    with pytest.raises(ValueError):
        rm.OccupancySpec(decay=1.5)


# ------------------------------------------------------------------------------------------------
# Gradients to the rays
# ------------------------------------------------------------------------------------------------

def test_march_gradients_native_match_reference(native):
    grid = _random_grid(37, 0.4, seed=16)
    o0, d0 = _random_rays(129, 17)
    near, far = rm.ray_aabb(o0, d0, grid)
    grads = []
    for backend in ("reference", "native"):
        o, d = o0.clone().requires_grad_(), d0.clone().requires_grad_()
        with use_backend(backend):
            s = rm.march_rays(o, d, near, far, grid, 0.02, 64)
        wp = torch.randn(s.positions.shape, generator=_gen(19))
        wd = torch.randn(s.directions.shape, generator=_gen(20))
        ((s.positions * wp).sum() + (s.directions * wd).sum()).backward()
        grads.append((o.grad, d.grad))
    assert grads[0][0].abs().sum() > 0
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_march_gradcheck(request, backend):
    if backend == "native":
        request.getfixturevalue("native")
    grid = _random_grid(5, 0.6, seed=21)
    o0, d0 = _random_rays(4, 22, torch.float64, spread=0.8)
    near, far = rm.ray_aabb(o0, d0, grid)
    jitter = torch.rand(4, generator=_gen(23), dtype=torch.float64)

    def f(o, d):
        with use_backend(backend):
            s = rm.march_rays(o, d, near, far, grid, 0.1, 8, jitter=jitter)
        return s.positions, s.directions

    o, d = o0.clone().requires_grad_(), d0.clone().requires_grad_()
    assert f(o, d)[0].shape[0] > 3
    assert torch.autograd.gradcheck(f, (o, d), eps=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# Occupancy grid
# ------------------------------------------------------------------------------------------------

def test_grid_starts_fully_occupied():
    grid = rm.OccupancyGrid(rm.OccupancySpec(resolution=13))
    assert grid.bitfield.dtype == torch.uint8 and grid.bitfield.shape == ((13 ** 3 + 7) // 8,)
    assert grid.occupied_fraction() == 1.0
    assert grid.density.shape == (13, 13, 13) and grid.density.dtype == torch.float32
    assert float(grid.density.abs().sum()) == 0.0


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_grid_update_decay_and_max(request, backend):
    if backend == "native":
        request.getfixturevalue("native")
    spec = rm.OccupancySpec(resolution=11, decay=0.9, threshold=0.01)
    grid = rm.OccupancyGrid(spec)
    with use_backend(backend):
        grid.update(lambda p: torch.full((p.shape[0],), 0.5), "all")
        assert torch.allclose(grid.density, torch.full_like(grid.density, 0.5))
        grid.update(lambda p: torch.full((p.shape[0],), 0.2), "all")  # decayed 0.45 beats 0.2
        assert torch.allclose(grid.density, torch.full_like(grid.density, 0.45))
        grid.update(lambda p: torch.full((p.shape[0],), 1.0), "all", chunk=100)  # chunked calls
        assert torch.allclose(grid.density, torch.ones_like(grid.density))
        # partial update: sampled cells get max(decayed, value), the others only decay
        seen = []

        def fn(p):
            seen.append(p)
            return (p[:, 0] > 0).float() * 3.0

        before = grid.density.clone()
        grid.update(fn, 301, generator=_gen(24))
        pts = torch.cat(seen)
        assert pts.shape == (301, 3)
        expected = (before * 0.9).reshape(-1)
        cells = grid.cell_of(pts)
        assert (cells >= 0).all()
        expected.scatter_reduce_(0, cells, (pts[:, 0] > 0).float() * 3.0, "amax")
        torch.testing.assert_close(grid.density.reshape(-1), expected)
        # negative / NaN densities count as 0
        grid.update(lambda p: torch.full((p.shape[0],), float("nan")), "all")
        grid.update(lambda p: torch.full((p.shape[0],), -5.0), "all")
        assert (grid.density >= 0).all()


def test_grid_update_native_matches_reference(native):
    spec = rm.OccupancySpec(resolution=23, aabb=(-1, -1, -1, 1, 1, 2))
    fn = lambda p: torch.relu(1.0 - p.norm(dim=-1)) * 5  # noqa: E731
    grids = []
    for backend in ("reference", "native"):
        grid = rm.OccupancyGrid(spec)
        with use_backend(backend):
            grid.update(fn, "all", generator=_gen(25))
            for k in range(4):
                grid.update(fn, 2001, generator=_gen(26 + k))  # duplicates among the cells
        grids.append(grid)
    assert torch.equal(grids[0].density, grids[1].density)
    assert torch.equal(grids[0].bitfield, grids[1].bitfield)
    assert 0.05 < grids[0].occupied_fraction() < 0.9


def test_sampled_cells_favour_occupied():
    grid, before = _sphere_grid(16, 0.3), _sphere_grid(16, 0.3)
    seen = []
    grid.update(lambda p: seen.append(p) or torch.zeros(p.shape[0]), 1000, generator=_gen(27))
    frac = float(before.is_occupied(torch.cat(seen)).float().mean())
    assert frac > 0.45 > before.occupied_fraction()  # half of them come from the occupied cells


@pytest.mark.parametrize("mean_below_threshold", [True, False])
def test_bitfield_matches_density_threshold(native, mean_below_threshold):
    spec = rm.OccupancySpec(resolution=19, threshold=0.05)
    g = _gen(28)
    for backend in ("reference", "native"):
        grid = rm.OccupancyGrid(spec)
        scale = 0.06 if mean_below_threshold else 1.0
        grid.density.copy_(torch.rand(grid.density.shape, generator=g) ** 4 * scale)
        with use_backend(backend):
            grid.pack()
        thr = min(float(grid.density.mean()), 0.05)
        assert (thr < 0.05) == mean_below_threshold
        bits = rm.unpack_bits(grid.bitfield, spec.num_cells)
        assert torch.equal(bits, grid.density.reshape(-1) > thr)
        # padding bits of the last byte stay clear
        assert int(grid.bitfield[-1]) >> (spec.num_cells % 8) == 0


def test_cell_of_and_bit_order():
    spec = rm.OccupancySpec(resolution=4, aabb=(0, 0, 0, 4, 8, 12))
    grid = rm.OccupancyGrid(spec)
    pts = torch.tensor([[0.5, 0.5, 0.5], [3.5, 0.5, 0.5], [0.5, 2.5, 0.5], [0.5, 0.5, 3.5], [3.9, 7.9, 11.9],
                        [-0.1, 1.0, 1.0], [4.0, 1.0, 1.0], [1.0, 1.0, 12.5]])
    assert grid.cell_of(pts).tolist() == [0, 3, 4, 16, 63, -1, -1, -1]
    grid.density.zero_()
    grid.density[1, 2, 3] = 1.0  # [z, y, x]: cell 3 + 4 * (2 + 4 * 1) = 27
    grid.pack()
    assert rm.unpack_bits(grid.bitfield, 64).nonzero().squeeze(1).tolist() == [27]
    assert int(grid.bitfield[27 >> 3]) == 1 << (27 & 7)
    assert grid.is_occupied(torch.tensor([[3.5, 4.5, 3.5], [0.5, 0.5, 0.5], [9.0, 0.0, 0.0]])).tolist() == [
        True, False, False]


def test_state_dict_round_trip(native):
    grid = _random_grid(21, 0.3, seed=29)
    grid.density.mul_(torch.rand(grid.density.shape, generator=_gen(30)))
    state = grid.state_dict()
    assert set(state) == {"density", "bitfield"}
    other = rm.OccupancyGrid(grid.spec)
    other.load_state_dict(state)
    assert torch.equal(other.density, grid.density) and torch.equal(other.bitfield, grid.bitfield)
    o, d = _random_rays(40, 31)
    near, far = rm.ray_aabb(o, d, grid)
    _assert_same_samples(rm.march_rays(o, d, near, far, grid, 0.02, 100),
                         rm.march_rays(o, d, near, far, other, 0.02, 100))


# ------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", [[], ["-arch=sm_80"]], ids=["default-arch", "sm_80"])
def test_cuda_kernel_compiles(tmp_path, arch):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    cmd = [nvcc, "-std=c++17", "-O3", *arch, "-I", str(KERNELS), "-c", str(KERNELS / "cuda" / "raymarch.cu"),
           "-o", str(tmp_path / "raymarch.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "raymarch.o").stat().st_size > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_reference():
    try:
        _native.load("cuda")
    except NotAvailable as exc:
        pytest.skip(f"CUDA kernels unavailable: {exc}")
    grid = _random_grid(37, 0.3, seed=32)
    o, d = _random_rays(333, 33)
    jitter = torch.rand(333, generator=_gen(34))
    near, far = rm.ray_aabb(o, d, grid)
    with use_backend("reference"):
        a = rm.march_rays(o, d, near, far, grid, 0.013, 1000, 0.01, 0.05, jitter)
    grid_cuda = grid.to("cuda")
    with use_backend("native"):
        nc, fc = rm.ray_aabb(o.cuda(), d.cuda(), grid_cuda)
        b = rm.march_rays(o.cuda(), d.cuda(), near.cuda(), far.cuda(), grid_cuda, 0.013, 1000, 0.01, 0.05,
                          jitter.cuda())
        packed = rm._pack(grid_cuda.density, 0.5)
    torch.testing.assert_close(nc.cpu(), near, rtol=0, atol=0)
    torch.testing.assert_close(fc.cpu(), far, rtol=0, atol=0)
    _assert_same_samples(a, rm.RaySamples(*(x.cpu() for x in (b.positions, b.directions, b.ts, b.deltas,
                                                               b.ray_indices, b.ray_offsets))))
    assert torch.equal(packed.cpu(), rm._pack_reference(grid.density, 0.5))

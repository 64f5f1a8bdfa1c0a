"""Hierarchical (NeRF) sampling: stratified coarse samples, importance-sampled fine samples, and
their compatibility with the compositing op."""

from __future__ import annotations

import math

import pytest
import torch

from talkcli.avatar.sampling import importance, stratified
from talkcli.ops.composite import composite
from talkcli.ops.raymarch import RaySamples, ray_aabb

BOX = (-1.0, -1.0, -1.0, 1.0, 1.0, 1.0)


def rays(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays from z = -3 towards the box, the last one missing it."""
    g = torch.Generator().manual_seed(seed)
    o = torch.cat([torch.rand(n, 2, generator=g) - 0.5, torch.full((n, 1), -3.0)], 1)
    d = torch.cat([0.1 * (torch.rand(n, 2, generator=g) - 0.5), torch.ones(n, 1)], 1)
    o[-1, 0] = 5.0
    return o, d


def per_ray(samples: RaySamples, x: torch.Tensor) -> list[torch.Tensor]:
    off = samples.ray_offsets.tolist()
    return [x[a:b] for a, b in zip(off[:-1], off[1:])]


def composite_density(samples: RaySamples, sigma) -> torch.Tensor:
    s = sigma(samples.positions)
    return composite(s, torch.ones(s.shape[0], 3), samples.deltas, samples.ts, samples.ray_offsets,
                     stop_transmittance=0.0).opacity


# ------------------------------------------------------------------------------------------------
# stratified
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("jitter", [False, True])
def test_stratified_counts_range_order(jitter):
    o, d = rays()
    near, far = ray_aabb(o, d, BOX)
    assert float(far[-1]) <= float(near[-1])  # the miss
    jit = torch.Generator().manual_seed(1) if jitter else False
    s = stratified(o, d, near, far, 16, jit)
    assert s.counts().tolist() == [16] * 5 + [0]
    assert s.ray_offsets.dtype == torch.int64 and int(s.ray_offsets[-1]) == s.num_samples == 80
    assert s.ray_indices.tolist() == torch.arange(5).repeat_interleave(16).tolist()
    assert s.ts.dtype == s.deltas.dtype == s.positions.dtype == torch.float32
    for r, t in enumerate(per_ray(s, s.ts)[:5]):
        assert bool((t >= near[r]).all()) and bool((t <= far[r]).all())
        assert bool((t[1:] > t[:-1]).all())
    for r, dl in enumerate(per_ray(s, s.deltas)[:5]):
        assert torch.allclose(dl, (far[r] - near[r]) / 16 * torch.ones(16))
    torch.testing.assert_close(s.positions, o[s.ray_indices] + s.ts[:, None] * d[s.ray_indices])
    torch.testing.assert_close(s.directions, d[s.ray_indices])


def test_stratified_bin_centres_and_jitter():
    o, d = rays(3)
    near = torch.tensor([1.0, 2.0, 5.0])
    far = torch.tensor([3.0, 2.0, 4.0])  # rays 1 and 2 are empty
    s = stratified(o, d, near, far, 4, False)
    assert s.counts().tolist() == [4, 0, 0]
    torch.testing.assert_close(s.ts, torch.tensor([1.25, 1.75, 2.25, 2.75]))
    torch.testing.assert_close(s.deltas, torch.full((4,), 0.5))
    a = stratified(o, d, near, far, 4, torch.Generator().manual_seed(3))
    b = stratified(o, d, near, far, 4, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.ts, b.ts)
    assert not torch.equal(a.ts, s.ts)
    # One sample per bin.
    assert ((a.ts - 1.0) / 0.5).floor().tolist() == [0, 1, 2, 3]
    none = stratified(o, d, far, near - 10, 4, True)
    assert none.num_samples == 0 and none.ray_offsets.tolist() == [0, 0, 0, 0]


# ------------------------------------------------------------------------------------------------
# importance
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("deterministic", [False, True])
def test_importance_merged_sorted_and_counts(deterministic):
    o, d = rays()
    near, far = ray_aabb(o, d, BOX)
    g = torch.Generator().manual_seed(0)
    c = stratified(o, d, near, far, 8, g)
    w = torch.rand(c.num_samples, generator=g)
    f = importance(o, d, c, w, 24, g, deterministic, near=near, far=far)
    assert f.counts().tolist() == [32] * 5 + [0]
    assert not f.ts.requires_grad and f.ts.dtype == torch.float32
    for r, (t, ct, dl) in enumerate(zip(per_ray(f, f.ts)[:5], per_ray(c, c.ts), per_ray(f, f.deltas))):
        assert bool((t[1:] >= t[:-1]).all())
        assert bool((t >= near[r]).all()) and bool((t <= far[r]).all())
        assert bool(torch.isin(ct, t).all())  # the coarse samples are kept
        torch.testing.assert_close(dl, torch.cat([t[1:], far[r:r + 1]]) - t)  # distance to the next / far
    torch.testing.assert_close(f.positions, o[f.ray_indices] + f.ts[:, None] * d[f.ray_indices])


@pytest.mark.parametrize("deterministic", [False, True])
def test_importance_concentrated_weight(deterministic):
    o, d = rays(2)
    near, far = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    c = stratified(o, d, near, far, 16, False)
    w = torch.zeros(32)
    w[5] = 1.0        # ray 0, bin 5
    w[16 + 15] = 0.3  # ray 1, the last bin
    f = importance(o, d, c, w, 64, torch.Generator().manual_seed(2), deterministic)
    (t0, t1) = per_ray(f, f.ts)
    ct0, ct1 = per_ray(c, c.ts)
    # Bin edges: the midpoints of the coarse ts (here the stratified bin boundaries).
    lo, hi = 0.5 * (ct0[4] + ct0[5]), 0.5 * (ct0[5] + ct0[6])
    inside0 = int(((t0 > lo) & (t0 < hi)).sum()) - 1  # minus the coarse sample in the bin
    inside1 = int((t1 > 0.5 * (ct1[14] + ct1[15])).sum()) - 1
    need = 64 if deterministic else 63  # the 1e-5 padding may send the odd random sample elsewhere
    assert inside0 >= need and inside1 >= need


def test_importance_matches_pdf():
    # Two coarse samples (ts 1 and 3, bins [0, 2] and [2, 4]) weighted 0.25 / 0.75.
    o, d = rays(1)
    c = stratified(o, d, torch.tensor([0.0]), torch.tensor([4.0]), 2, False)
    w = torch.tensor([0.25, 0.75])
    n = 20000
    f = importance(o, d, c, w, n, torch.Generator().manual_seed(0))
    assert f.num_samples == n + 2
    fine = f.ts[f.ts != 1.0]
    fine = fine[fine != 3.0]
    assert fine.numel() == n
    assert bool((fine >= 0).all()) and bool((fine <= 4).all())
    assert abs(float((fine < 2).float().mean()) - 0.25) < 0.015
    # Uniform inside each bin (piecewise-constant PDF).
    assert abs(float(fine[fine < 2].mean()) - 1.0) < 0.05 and abs(float(fine[fine >= 2].mean()) - 3.0) < 0.05
    det = importance(o, d, c, w, 100, deterministic=True)
    assert int((det.ts < 2).sum()) == 25 + 1


def test_importance_skips_empty_rays_and_rejects_ragged():
    o, d = rays(4)
    near = torch.tensor([0.0, 1.0, 0.0, 2.0])
    far = torch.tensor([2.0, 1.0, 3.0, 0.0])
    c = stratified(o, d, near, far, 5, False)
    f = importance(o, d, c, torch.ones(c.num_samples), 7)
    assert f.counts().tolist() == [12, 0, 12, 0]
    assert f.ray_indices.tolist() == [0] * 12 + [2] * 12
    empty = stratified(o, d, near, near, 5, False)
    assert empty.num_samples == 0
    assert importance(o, d, empty, torch.zeros(0), 7).ray_offsets.tolist() == [0, 0, 0, 0, 0]
    ragged = RaySamples(c.positions[:9], c.directions[:9], c.ts[:9], c.deltas[:9], c.ray_indices[:9],
                        torch.tensor([0, 5, 5, 9, 9]))
    with pytest.raises(ValueError, match="same number"):
        importance(o, d, ragged, torch.ones(9), 7)
    with pytest.raises(ValueError):
        importance(o, d, c, torch.ones(3), 7)


def test_positions_keep_ray_gradients():
    o, d = rays(2)
    o.requires_grad_(True)
    c = stratified(o, d, torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0]), 4, False)
    f = importance(o, d, c, torch.ones(8), 4, deterministic=True)
    f.positions.sum().backward()
    torch.testing.assert_close(o.grad, torch.full((2, 3), 8.0))
    assert not f.ts.requires_grad and not f.deltas.requires_grad


# ------------------------------------------------------------------------------------------------
# compatibility with composite
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("deterministic,sigma", [(True, 1.0), (False, 2.0), (True, 4.0)])
def test_composite_constant_slab(deterministic, sigma):
    """Rays through a slab of constant density (the box): opacity = 1 - exp(-sigma * length)."""
    o, d = rays(6)
    near, far = ray_aabb(o, d, BOX)
    density = lambda p: torch.full((p.shape[0],), sigma)  # noqa: E731  (every sample is in the box)
    g = torch.Generator().manual_seed(4)
    c = stratified(o, d, near, far, 64, g)
    coarse = composite(density(c.positions), torch.ones(c.num_samples, 3), c.deltas, c.ts, c.ray_offsets)
    expected = 1.0 - torch.exp(-sigma * (far - near))
    expected[-1] = 0.0  # the miss
    torch.testing.assert_close(coarse.opacity, expected, atol=1e-5, rtol=0)
    f = importance(o, d, c, coarse.weights, 256, g, deterministic, near=near, far=far)
    opacity = composite_density(f, density)
    assert float((opacity - expected).abs().max()) < 1e-3
    assert math.isclose(float(f.deltas[f.ray_offsets[0]:f.ray_offsets[1]].sum()),
                        float(far[0] - f.ts[0]), rel_tol=1e-5)

"""Mesh-anchored hash blendshapes: UV U-Net, UV sampling/rasterizing, error-correcting warp."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from talkcli.avatar.uvnet import UVRasterizer, UVUNet, sample_at_uv
from talkcli.avatar.warp import (WarpField, elastic_loss, magnitude_loss, quaternion_to_matrix_from_log,
                                 windowed_posenc)

TINY = dict(encoder=(8, 16, 32), decoder=(32, 16, 16), size=32)

# --------------------------------------------------------------------------- U-Net


@pytest.mark.parametrize("cfg,batch", [({}, 2), (TINY, 3)])
def test_unet_shapes_constant_channel_and_zero_initial_weights(cfg, batch):
    torch.manual_seed(0)
    net = UVUNet(**cfg)
    size = cfg.get("size", 128)
    w, f = net(torch.randn(batch, 3, size, size))
    assert w.shape == (batch, 5, size, size) and f.shape == (batch, 24, size, size)
    assert torch.equal(w[:, -1], torch.ones_like(w[:, -1]))
    assert torch.equal(w[:, :-1], torch.zeros_like(w[:, :-1]))
    assert f.abs().max() > 0


def test_unet_weights_head_learns_from_zero():
    torch.manual_seed(0)
    net = UVUNet(**TINY)
    w, _ = net(torch.randn(2, 3, 32, 32))
    (w[:, :-1] * torch.randn_like(w[:, :-1])).sum().backward()
    assert net.head.weight.grad[:4].abs().max() > 0
    assert net.down[0].conv1.weight.grad is not None


def test_unet_rejects_bad_configs():
    with pytest.raises(ValueError, match="as many decoder"):
        UVUNet(encoder=(8, 16), decoder=(16,), size=32)
    with pytest.raises(ValueError, match="divisible"):
        UVUNet(encoder=(8, 16, 32), decoder=(32, 16, 16), size=36)
    with pytest.raises(ValueError, match="expects"):
        UVUNet(**TINY)(torch.zeros(1, 3, 64, 64))


# --------------------------------------------------------------------------- UV sampling


def test_sample_at_uv_pixel_centre_and_bilinear_mix():
    torch.manual_seed(0)
    h, w = 6, 8
    maps = torch.randn(2, 3, h, w)
    i, j = 2, 5
    uv = torch.tensor([[(j + 0.5) / w, (i + 0.5) / h],      # centre of pixel (2, 5)
                       [(j + 0.75) / w, (i + 0.9) / h]])    # between centres (2..3, 5..6)
    out = sample_at_uv(maps, uv)
    assert out.shape == (2, 2, 3)
    torch.testing.assert_close(out[:, 0], maps[:, :, i, j], rtol=0, atol=1e-6)
    fx, fy = 0.25, 0.4
    mix = ((1 - fy) * ((1 - fx) * maps[:, :, i, j] + fx * maps[:, :, i, j + 1])
           + fy * ((1 - fx) * maps[:, :, i + 1, j] + fx * maps[:, :, i + 1, j + 1]))
    torch.testing.assert_close(out[:, 1], mix, rtol=0, atol=1e-6)


def _grid_mesh(n: int, lo: float, hi: float, jitter: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n x n UV grid over [lo, hi]^2 (interior points jittered), two triangles per cell, plus one
    isolated vertex (like an iris point) that belongs to no triangle."""
    rng = np.random.default_rng(seed)
    g = np.linspace(lo, hi, n)
    uv = np.stack(np.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    interior = ((uv > lo) & (uv < hi)).all(1)
    uv[interior] += rng.uniform(-jitter, jitter, (int(interior.sum()), 2))
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    tris = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    return np.concatenate([uv, [[0.95, 0.05]]]), tris


def test_rasterizer_reproduces_linear_functions_and_leaves_the_rest_zero():
    size, lo, hi = 32, 0.1, 0.8
    uv, tris = _grid_mesh(6, lo, hi, jitter=0.03)
    ras = UVRasterizer(uv, tris, size)
    coef = torch.tensor([[2.0, -1.0, 0.5], [-0.5, 3.0, 1.0]])  # per channel: a, b, c
    uvt = torch.as_tensor(uv, dtype=torch.float32)
    vals = uvt @ coef[:, :2].T + coef[:, 2]                       # (V, 2)
    vals[-1] = 100.0                                               # isolated vertex: must not show
    img = ras(torch.stack([vals, 2 * vals]))                       # (2, 2, size, size)
    assert img.shape == (2, 2, size, size)
    centres = (torch.arange(size) + 0.5) / size
    vv, uu = torch.meshgrid(centres, centres, indexing="ij")
    covered = (uu > lo) & (uu < hi) & (vv > lo) & (vv < hi)
    mask = torch.zeros(size * size, dtype=torch.bool)
    mask[ras.pixels] = True
    assert torch.equal(mask.view(size, size), covered)
    expect = coef[:, 0, None, None] * uu + coef[:, 1, None, None] * vv + coef[:, 2, None, None]
    torch.testing.assert_close(img[0][:, covered], expect[:, covered], rtol=0, atol=1e-5)
    torch.testing.assert_close(img[1][:, covered], 2 * expect[:, covered], rtol=0, atol=1e-5)
    assert not img[:, :, ~covered].any()
    # sampling back at an interior vertex (all 4 neighbouring pixels covered) returns its value
    k = 14
    torch.testing.assert_close(sample_at_uv(img[:1], uvt[k:k + 1])[0, 0], vals[k], rtol=0, atol=1e-5)


def test_rasterizer_builds_fast_and_is_not_saved():
    uv, tris = _grid_mesh(22, 0.02, 0.98, jitter=0.01)  # 882 triangles, like the paper's mesh
    start = time.perf_counter()
    ras = UVRasterizer(uv, tris, 128)
    assert time.perf_counter() - start < 1.0
    assert ras.state_dict() == {}
    vals = torch.randn(1, len(uv), 3, requires_grad=True)
    ras(vals).sum().backward()
    assert vals.grad[0, :-1].abs().sum() > 0 and not vals.grad[0, -1].any()


# --------------------------------------------------------------------------- warp field


def _randomise_branches(warp: WarpField, std: float = 0.3) -> None:
    torch.manual_seed(1)
    for branch in (warp.rotation, warp.center, warp.translation):
        nn.init.normal_(branch[-1].weight, std=std)
        nn.init.normal_(branch[-1].bias, std=std)


def test_warp_starts_as_exact_identity():
    torch.manual_seed(0)
    warp = WarpField(n_frames=5)
    q = torch.randn(64, 3)
    frame = torch.randint(0, 5, (64,))
    torch.testing.assert_close(warp(q, frame, alpha=3.0), q, rtol=0, atol=1e-7)


def test_warp_rotations_are_proper():
    torch.manual_seed(0)
    warp = WarpField(n_frames=3)
    _randomise_branches(warp)
    rot, _, _ = warp.transform(torch.randn(100, 3), torch.randint(0, 3, (100,)), alpha=6.0)
    eye = torch.eye(3).expand(100, 3, 3)
    torch.testing.assert_close(rot @ rot.transpose(1, 2), eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(100), rtol=0, atol=1e-5)
    assert (rot - eye).abs().max() > 0.1


def test_log_quaternion_rotation_and_warp_formula():
    # r = (0, 0, pi/4): rotation by pi/2 about z, (x, y, z) -> (-y, x, z)
    rot = quaternion_to_matrix_from_log(torch.tensor([[0.0, 0.0, math.pi / 4]]))[0]
    torch.testing.assert_close(rot, torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
                               rtol=0, atol=1e-6)
    # through the field: output layers with zero weights and fixed biases give constant r, c, t
    warp = WarpField(n_frames=1)
    r, c, t = torch.tensor([0.0, 0.0, math.pi / 4]), torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.1, -0.2, 0.3])
    with torch.no_grad():
        for branch, value in ((warp.rotation, r), (warp.center, c), (warp.translation, t)):
            branch[-1].bias.copy_(value)
    q = torch.tensor([[0.3, -0.4, 0.7], [1.0, 0.0, -1.0]])
    p = q + c
    expect = torch.stack([-p[:, 1], p[:, 0], p[:, 2]], 1) - c + t
    torch.testing.assert_close(warp(q, torch.zeros(2, dtype=torch.long), alpha=0.0), expect,
                               rtol=0, atol=1e-6)


def test_log_quaternion_is_smooth_at_zero():
    r = torch.zeros(2, 3, requires_grad=True)
    rot = quaternion_to_matrix_from_log(r)
    assert torch.equal(rot, torch.eye(3).expand(2, 3, 3))
    (rot * torch.randn(2, 3, 3)).sum().backward()
    assert torch.isfinite(r.grad).all() and r.grad.abs().max() > 0
    # either side of the series threshold (|r|^2 = 1e-6): a rotation by 2|r| about x
    small = torch.tensor([[0.9e-3, 0.0, 0.0], [1.1e-3, 0.0, 0.0]])
    rot, angle = quaternion_to_matrix_from_log(small), 2 * small[:, 0]
    torch.testing.assert_close(rot[:, 1, 1], torch.cos(angle), rtol=0, atol=1e-7)
    torch.testing.assert_close(rot[:, 2, 1], torch.sin(angle), rtol=1e-5, atol=0)


def test_coarse_to_fine_window():
    x = torch.randn(10, 3)
    bands = 6
    off, full = windowed_posenc(x, bands, 0.0), windowed_posenc(x, bands, float(bands))
    assert off.shape == full.shape == (10, 3 * (1 + 2 * bands))
    assert torch.equal(off[:, :3], x) and not off[:, 3:].any()
    ang = x[:, None, :] * (2.0 ** torch.arange(bands) * math.pi)[:, None]
    torch.testing.assert_close(full, torch.cat([x, ang.sin().flatten(1), ang.cos().flatten(1)], 1))
    half = windowed_posenc(x, bands, 2.5)  # bands 0, 1 fully on, band 2 at half weight, rest off
    torch.testing.assert_close(half[:, 3 + 6:3 + 9], 0.5 * full[:, 3 + 6:3 + 9])
    assert not half[:, 3 + 9:3 + 18].any()


class _Scale(nn.Module):
    """A deliberately non-rigid warp: q' = s q."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(2.0))

    def forward(self, q: torch.Tensor, frame: torch.Tensor, alpha: float) -> torch.Tensor:
        return self.s * q


def test_elastic_loss():
    torch.manual_seed(0)
    q, frame = torch.randn(32, 3), torch.zeros(32, dtype=torch.long)
    warp = WarpField(n_frames=1)
    assert elastic_loss(warp, q, frame, 6.0).item() < 1e-10                # identity
    with torch.no_grad():                                                   # rigid: constant r, c, t
        for branch in (warp.rotation, warp.center, warp.translation):
            branch[-1].bias.normal_()
    assert elastic_loss(warp, q, frame, 6.0).item() < 1e-8
    scale = _Scale()                                                        # J = 2 I: 3 log(2)^2
    loss = elastic_loss(scale, q, frame, 6.0)
    torch.testing.assert_close(loss, torch.tensor(3 * math.log(2.0) ** 2))
    loss.backward()
    assert scale.s.grad.item() > 0
    _randomise_branches(warp)                                               # non-rigid field
    loss = elastic_loss(warp, q, frame, 6.0)
    assert loss.item() > 0
    loss.backward()
    grads = [p.grad for p in warp.rotation.parameters()] + [p.grad for p in warp.backbone.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().max() > 0 for g in grads)


def test_magnitude_loss():
    q = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    qw = torch.tensor([[1.0, 2.0, 2.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(magnitude_loss(q, qw), torch.tensor(4.5))  # (9 + 0) / 2

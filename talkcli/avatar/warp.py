"""Per-frame error-correcting warp of query points (paper end of Sec. 3.3, supp. B and C.3).

Tracking noise and unmodelled per-frame content (hair) misalign the 3DMM with the images; a
Nerfies-style SE(3) field, conditioned on a learned per-frame code, absorbs that during training
and is dropped at test time. Regularised by ``elastic_loss`` (stay locally rigid) and
``magnitude_loss`` (stay small).
"""

from __future__ import annotations

import math

import torch
from torch import nn

_SMALL = 1e-6  # below this squared angle the Taylor series replace sin/cos quotients


def windowed_posenc(x: torch.Tensor, bands: int, alpha: float) -> torch.Tensor:
    """``x`` (..., D) -> (..., D * (1 + 2 * bands)): [x, sin(2^k pi x) w_k, cos(2^k pi x) w_k].

    Nerfies' coarse-to-fine window ``w_k = (1 - cos(pi * clamp(alpha - k, 0, 1))) / 2`` fades the
    bands in as ``alpha`` goes 0 -> bands, so the warp first fits smooth, low-frequency motion
    and is not trapped by high-frequency fits early in training. The identity term is always on.
    """
    k = torch.arange(bands, dtype=x.dtype, device=x.device)
    window = (1.0 - torch.cos(math.pi * (alpha - k).clamp(0.0, 1.0))) / 2.0
    ang = x[..., None, :] * (2.0 ** k * math.pi)[:, None]  # (..., bands, D)
    w = window[:, None]
    return torch.cat([x, (ang.sin() * w).flatten(-2), (ang.cos() * w).flatten(-2)], dim=-1)


def quaternion_to_matrix_from_log(r: torch.Tensor) -> torch.Tensor:
    """Pure log-quaternion ``r`` (..., 3) -> rotation matrix (..., 3, 3).

    exp(r) = (cos|r|, sin|r| r/|r|): a rotation by 2|r| about r/|r|. Near r = 0, sin(x)/x and cos
    are taken from their series in x^2, and |r| is only formed where it is safely non-zero, so
    values and gradients are finite everywhere (r = 0 gives exactly the identity).
    """
    t2 = (r * r).sum(-1, keepdim=True)
    small = t2 < _SMALL
    t = torch.sqrt(torch.where(small, torch.ones_like(t2), t2))
    sinc = torch.where(small, 1.0 - t2 / 6.0 + t2 * t2 / 120.0, torch.sin(t) / t)
    cos = torch.where(small, 1.0 - t2 / 2.0 + t2 * t2 / 24.0, torch.cos(t))
    w = cos[..., 0]
    x, y, z = (sinc * r).unbind(-1)
    row0 = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1)
    row1 = torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1)
    row2 = torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1)
    return torch.stack([row0, row1, row2], dim=-2)


def _mlp(d_in: int, width: int, depth: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), nn.ReLU()]
    return layers


class WarpField(nn.Module):
    """(q, frame) -> q' = R (q + c) - c + t, with R, c, t regressed from PE(q) and the frame's code.

    Query points are expected in the model's normalised space (order of [-1, 1]): the encoding's
    highest band has period 2 / 2^(bands-1) there. The branches' output layers start at zero, so
    the warp starts as the exact identity and training only adds corrections.
    """

    def __init__(self, n_frames: int, latent_dim: int = 32, bands: int = 6, depth: int = 5,
                 width: int = 128, branch_depth: int = 2):
        super().__init__()
        self.bands = bands
        self.latents = nn.Embedding(n_frames, latent_dim)
        nn.init.normal_(self.latents.weight, std=0.01)
        d_in = 3 * (1 + 2 * bands) + latent_dim
        self.backbone = nn.Sequential(*_mlp(d_in, width, depth))
        width_in = width if depth else d_in

        def branch() -> nn.Sequential:
            out = nn.Linear(width if branch_depth else width_in, 3)
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
            return nn.Sequential(*_mlp(width_in, width, branch_depth), out)

        self.rotation, self.center, self.translation = branch(), branch(), branch()

    def transform(self, q: torch.Tensor, frame: torch.Tensor, alpha: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> per-point rotation (S, 3, 3), rotation centre (S, 3), translation (S, 3)."""
        h = self.backbone(torch.cat([windowed_posenc(q, self.bands, alpha), self.latents(frame)], dim=-1))
        return quaternion_to_matrix_from_log(self.rotation(h)), self.center(h), self.translation(h)

    def forward(self, q: torch.Tensor, frame: torch.Tensor, alpha: float) -> torch.Tensor:
        """``q`` (S, 3), ``frame`` (S,) long, ``alpha`` in [0, bands] -> warped points (S, 3)."""
        rot, c, t = self.transform(q, frame, alpha)
        return (rot @ (q + c)[..., None])[..., 0] - c + t


def elastic_loss(warp: nn.Module, q: torch.Tensor, frame: torch.Tensor, alpha: float) -> torch.Tensor:
    """Nerfies' elastic regulariser: mean over points of ||log svd(J)||^2, J = dq'/dq (3x3).

    Zero exactly where the warp is locally a rotation (all singular values 1), so it penalises
    stretching and squashing, not rigid motion. The Jacobian rows come from three
    ``autograd.grad`` passes with ``create_graph`` (each output point depends only on its own
    input, so the gradient of a row's sum is that row for every point); the loss is thus
    differentiable w.r.t. the warp's parameters. ``q`` is detached: the loss shapes the warp, not
    the sample positions. Pass a small subset of points (~256): it costs three extra backwards.
    """
    with torch.enable_grad():
        qg = q.detach().requires_grad_(True)
        out = warp(qg, frame, alpha)
        rows = [torch.autograd.grad(out[:, i].sum(), qg, create_graph=True)[0] for i in range(3)]
    jac = torch.stack(rows, dim=1)  # (S, 3, 3): row i = d q'_i / d q
    sv = torch.linalg.svdvals(jac).clamp_min(1e-6)
    return torch.log(sv).square().sum(-1).mean()


def magnitude_loss(q: torch.Tensor, q_warped: torch.Tensor) -> torch.Tensor:
    """Mean over points of ||q - q'||^2 (the paper sums; the mean keeps lambda_mag independent of
    how many samples a batch has)."""
    return (q - q_warped).square().sum(-1).mean()

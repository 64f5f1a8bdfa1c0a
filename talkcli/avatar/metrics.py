"""Image metrics shared by training logs and ``talk eval``: PSNR and SSIM (Wang et al. 2004)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1]."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else -10.0 * float(np.log10(mse))


def _gauss(size: int = 11, sigma: float = 1.5, dtype=torch.float32) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim_map(a: torch.Tensor, b: torch.Tensor, window: int = 11) -> torch.Tensor:
    """Per-pixel SSIM of (N, C, H, W) images in [0, 1] (Gaussian 11x11, sigma 1.5; valid region),
    differentiable (the lips fine-tuning substitute for LPIPS uses 1 - SSIM)."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    g = _gauss(window, dtype=a.dtype).to(a.device)
    ch = a.shape[1]
    kx = g.view(1, 1, 1, -1).expand(ch, 1, 1, -1)
    ky = g.view(1, 1, -1, 1).expand(ch, 1, -1, 1)

    def blur(x):
        return F.conv2d(F.conv2d(x, kx, groups=ch), ky, groups=ch)

    mu_a, mu_b = blur(a), blur(b)
    saa = blur(a * a) - mu_a ** 2
    sbb = blur(b * b) - mu_b ** 2
    sab = blur(a * b) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two (H, W, 3) images in [0, 1]."""
    ta = torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64).permute(2, 0, 1)[None]
    tb = torch.as_tensor(np.ascontiguousarray(b), dtype=torch.float64).permute(2, 0, 1)[None]
    return float(ssim_map(ta, tb).mean())

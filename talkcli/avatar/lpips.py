"""LPIPS (Zhang et al. 2018, AlexNet variant) from user-supplied weights, with no torchvision.

Two files, put in ``~/.cache/talkcli/models/lpips/`` (or ``$TALKCLI_LPIPS``): ``alex.pth``, the
linear layers of the ``lpips`` package (weights/v0.1/alex.pth: ``lin0.model.1.weight`` ..
``lin4.model.1.weight``), and torchvision's AlexNet checkpoint ``alexnet-*.pth`` (``features.N.*``).
The network is AlexNet's five conv layers written out here; LPIPS is the sum over the five ReLU
outputs of the spatially averaged, channel-weighted squared difference of unit-normalised features.
Inputs are RGB in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

_CONVS = ((0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1), (8, 384, 256, 3, 1, 1),
          (10, 256, 256, 3, 1, 1))  # (index in features, in, out, kernel, stride, padding)
_CHANNELS = (64, 192, 384, 256, 256)


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, s, p) for _, i, o, k, s, p in _CONVS)
        self.lins = nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1)) for c in _CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = ((x * 2 - 1) - self.shift) / self.scale
        out = []
        for i, conv in enumerate(self.convs):
            if i in (1, 2):  # AlexNet max-pools before conv 2 and conv 3
                h = F.max_pool2d(h, 3, 2)
            h = F.relu(conv(h))
            out.append(h)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(N,) distances of (N, 3, H, W) images in [0, 1] (H, W >= 32)."""
        total = 0
        for fa, fb, w in zip(self._features(a), self._features(b), self.lins):
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + ((na - nb) ** 2 * w).sum(1).mean((1, 2))
        return total


def at_least_64(*images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(N, 3, H, W) images bilinearly upsampled to 64 px when smaller (AlexNet needs >= 32 px)."""
    if images[0].shape[-1] >= 64:
        return images
    return tuple(F.interpolate(im, size=64, mode="bilinear", align_corners=False) for im in images)


def load_lpips() -> LPIPS | None:
    """LPIPS when its two files are configured (``talk info`` shows where), else None."""
    from ..models import OPTIONAL_MODELS, check, model_dir

    spec = next(m for m in OPTIONAL_MODELS if m.name == "lpips")
    ok, _ = check(spec)
    if not ok:
        return None
    d = model_dir(spec)
    net = LPIPS()
    try:
        lin = torch.load(d / "alex.pth", map_location="cpu", weights_only=True)
        alex = torch.load(sorted(d.glob("alexnet-*.pth"))[0], map_location="cpu", weights_only=True)
        with torch.no_grad():
            for conv, (idx, *_rest) in zip(net.convs, _CONVS):
                conv.weight.copy_(alex[f"features.{idx}.weight"])
                conv.bias.copy_(alex[f"features.{idx}.bias"])
            for k, w in enumerate(net.lins):
                w.copy_(lin[f"lin{k}.model.1.weight"])
    except (KeyError, RuntimeError, OSError, IndexError) as exc:
        raise InputError(f"the LPIPS weights in {d} are not lpips' alex.pth and torchvision's AlexNet "
                         f"checkpoint ({type(exc).__name__}: {exc})") from None
    return net.eval()

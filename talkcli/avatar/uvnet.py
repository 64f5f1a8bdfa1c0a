"""The UV-space U-Net of mesh-anchored hash table blendshapes (paper Sec. 3.2, supp. C.1).

Vertex displacements are rasterized into a UV image (``UVRasterizer``), the U-Net turns that image
into a blend-weights map and a feature map, and both are read back at the vertices' UVs
(``sample_at_uv``).

UV convention (shared by both directions, so rasterize -> sample round-trips): ``u`` runs along
the image width (x), ``v`` along its height (y), and pixel (i, j) has its centre at
((j + 0.5) / W, (i + 0.5) / H). A mesh whose UVs have v pointing up must be flipped by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SLOPE = 0.2  # leaky ReLU slope after every convolution (supp. C.1)


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    # in place: the input is always a fresh conv output, and saving a 64x128x128 copy per layer
    # is a large share of the CPU time
    return F.leaky_relu(x, SLOPE, inplace=True)


class _Down(nn.Module):
    """Residual block halving the resolution: 3x3/s2 conv -> 3x3 conv, plus a 1x1/s2 shortcut."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.short = nn.Conv2d(cin, cout, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _lrelu(self.conv2(_lrelu(self.conv1(x))) + self.short(x))


class _Up(nn.Module):
    """Residual block at the input resolution, then a 2x2/s2 transposed conv doubling it.

    Main path 3x3 conv, shortcut 1x1 conv (channel change). The 3x3 conv works before the
    upsampling, where it costs a quarter of what it would after, and the transposed conv sees only
    ``cout`` channels: measured ~30 % faster on CPU than upsampling first, which matters as the net
    runs on 8 maps per training step.
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.short = nn.Conv2d(cin, cout, 1)
        self.up = nn.ConvTranspose2d(cout, cout, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _lrelu(self.up(_lrelu(self.conv(x)) + self.short(x)))


class UVUNet(nn.Module):
    """Displacement map (B, in_channels, size, size) -> blend-weights map and feature map.

    Encoder: ``len(encoder)`` down blocks (size -> size/2 -> ... ). Decoder: as many up blocks back
    to ``size``; each up block's input is the previous decoder output concatenated with the encoder
    feature of the same resolution (U-Net skips). At full resolution the skip is the input map
    itself, fed to the 1x1 heads next to the last decoder feature (done as two 1x1 convs that are
    summed, which equals one 1x1 conv over the concatenation without materialising it).
    """

    def __init__(self, in_channels: int = 3, encoder: Sequence[int] = (8, 16, 32, 64, 128, 256),
                 decoder: Sequence[int] = (128, 64, 64, 64, 64, 64), n_weights: int = 4,
                 feature_dim: int = 24, size: int = 128):
        super().__init__()
        encoder, decoder = tuple(int(c) for c in encoder), tuple(int(c) for c in decoder)
        if not encoder or len(encoder) != len(decoder):
            raise ValueError(f"UVUNet needs as many decoder as encoder levels (>= 1), got "
                             f"encoder={encoder} decoder={decoder}")
        if min(encoder + decoder + (in_channels, feature_dim)) < 1 or n_weights < 0:
            raise ValueError("UVUNet channel counts must be positive (n_weights may be 0: one constant table)")
        if size < 2 ** len(encoder) or size % 2 ** len(encoder):
            raise ValueError(f"UVUNet size {size} must be divisible by 2**{len(encoder)} "
                             f"(one halving per encoder level)")
        self.size, self.n_weights, self.feature_dim = size, n_weights, feature_dim
        chans = (in_channels,) + encoder
        self.down = nn.ModuleList(_Down(chans[i], chans[i + 1]) for i in range(len(encoder)))
        skips = encoder[-2::-1] + (0,)  # encoder feature concatenated after each decoder block
        ins = (encoder[-1],) + tuple(decoder[i] + skips[i] for i in range(len(decoder) - 1))
        self.up = nn.ModuleList(_Up(ins[i], decoder[i]) for i in range(len(decoder)))
        out = n_weights + feature_dim
        self.head = nn.Conv2d(decoder[-1], out, 1)
        self.head_in = nn.Conv2d(in_channels, out, 1, bias=False)
        # Zero weights at start: the blend is then exactly the constant-one table, i.e. a static
        # (expression-independent) hash field, and the expression-dependent tables are mixed in
        # only as fast as training asks for them; random initial weights would instead scramble
        # the tables per vertex and per expression. Gradients still reach the head through the
        # (non-zero initialised) hash tables it multiplies, so nothing is stuck at zero.
        with torch.no_grad():
            self.head.weight[:n_weights].zero_()
            self.head.bias[:n_weights].zero_()
            self.head_in.weight[:n_weights].zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> weights (B, n_weights + 1, H, W), last channel constant 1; features (B, feature_dim, H, W)."""
        if x.dim() != 4 or x.shape[-2:] != (self.size, self.size):
            raise ValueError(f"UVUNet expects (B, C, {self.size}, {self.size}), got {tuple(x.shape)}")
        feats = [x]
        for block in self.down:
            feats.append(block(feats[-1]))
        h = feats.pop()
        for i, block in enumerate(self.up):
            if i:
                h = torch.cat([h, feats.pop()], dim=1)
            h = block(h)
        out = self.head(h).add_(self.head_in(x))
        w = out[:, :self.n_weights]
        ones = torch.ones_like(out[:, :1])
        return torch.cat([w, ones], dim=1), out[:, self.n_weights:]


def sample_at_uv(maps: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear read of ``maps`` (B, C, H, W) at ``uv`` (V, 2) in [0, 1] -> (B, V, C).

    Border padding: vertices within half a pixel of the atlas edge read the edge pixel instead of
    blending towards zero.
    """
    b = maps.shape[0]
    grid = (uv.to(maps.dtype) * 2.0 - 1.0).reshape(1, -1, 1, 2).expand(b, -1, 1, 2)
    out = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[..., 0].transpose(1, 2)


def _raster_table(uv: np.ndarray, triangles: np.ndarray, size: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pixel flat index (P,), vertex ids (P, 3), barycentric weights (P, 3)) of covered pixels."""
    pts = np.asarray(uv, dtype=np.float64) * size - 0.5  # pixel-centre coordinates: centre j at j
    pix, vid, bary = [], [], []
    eps = 1e-9
    for tri in np.asarray(triangles, dtype=np.int64):
        a, b, c = pts[tri]
        e1, e2 = b - a, c - a
        det = e1[0] * e2[1] - e1[1] * e2[0]
        if abs(det) < 1e-12:  # degenerate in UV: covers no area
            continue
        lo = np.maximum(np.ceil(np.minimum(np.minimum(a, b), c) - eps), 0).astype(np.int64)
        hi = np.minimum(np.floor(np.maximum(np.maximum(a, b), c) + eps), size - 1).astype(np.int64)
        if np.any(hi < lo):
            continue
        ys, xs = np.mgrid[lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
        dx, dy = xs.ravel() - a[0], ys.ravel() - a[1]
        lb = (dx * e2[1] - dy * e2[0]) / det
        lc = (e1[0] * dy - e1[1] * dx) / det
        la = 1.0 - lb - lc
        inside = (la >= -eps) & (lb >= -eps) & (lc >= -eps)
        if not inside.any():
            continue
        pix.append(ys.ravel()[inside] * size + xs.ravel()[inside])
        vid.append(np.broadcast_to(tri, (int(inside.sum()), 3)))
        bary.append(np.stack([la[inside], lb[inside], lc[inside]], axis=1))
    if not pix:
        return np.zeros(0, np.int64), np.zeros((0, 3), np.int64), np.zeros((0, 3), np.float32)
    p, v, w = np.concatenate(pix), np.concatenate(vid), np.concatenate(bary)
    p, first = np.unique(p, return_index=True)  # shared edges: keep one triangle per pixel
    w = np.clip(w[first], 0.0, 1.0)
    return p, v[first], (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


class UVRasterizer(nn.Module):
    """Per-vertex values (B, V, C) -> UV image (B, C, size, size) by barycentric interpolation.

    Which pixel lies in which UV triangle is fixed by the mesh, so it is found once here and each
    call is a gather and a weighted sum. Pixels outside every triangle are 0; vertices in no
    triangle (e.g. added iris points) never contribute. The tables are non-persistent buffers:
    they follow ``.to()`` but are not saved, being rebuilt from the mesh's UVs and triangles.
    """

    pixels: torch.Tensor
    vertex_ids: torch.Tensor
    weights: torch.Tensor

    def __init__(self, uv: np.ndarray, triangles: np.ndarray, size: int):
        super().__init__()
        self.size = int(size)
        p, v, w = _raster_table(uv, triangles, self.size)
        self.register_buffer("pixels", torch.from_numpy(p), persistent=False)
        self.register_buffer("vertex_ids", torch.from_numpy(np.ascontiguousarray(v)), persistent=False)
        self.register_buffer("weights", torch.from_numpy(w), persistent=False)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        b, _, c = values.shape
        interp = (values[:, self.vertex_ids] * self.weights[None, :, :, None].to(values.dtype)).sum(dim=2)
        out = values.new_zeros(b, c, self.size * self.size)
        out[:, :, self.pixels] = interp.transpose(1, 2)
        return out.view(b, c, self.size, self.size)

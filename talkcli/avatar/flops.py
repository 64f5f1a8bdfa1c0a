"""Floating-point operations of rendering one frame, counted from the networks' shapes.

A frame costs what its samples cost (the head field at every marched sample) plus what is done
once per frame (R2-Talker's landmark encoder; the mesh-anchored avatar's U-Net, anchor frames and
k-NN search grid) plus the torso at every pixel. The number of samples comes from an actual
render (``render_frame(..., stats=...)``). A multiply-add is 2 operations; a hash-grid level
costs its 2^D corner weights and the weighted sum of their features; activations are not
counted (the paper's convention, Sec. 4.1: FLOPs of the networks).
"""

from __future__ import annotations

import torch


def _mlp(dims: list[int]) -> int:
    return sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))


def _hash(levels: int, features: int, dims: int = 3) -> int:
    corners = 2 ** dims
    return levels * (corners * (dims + 2 * features))  # corner weights (products) + weighted sums


def _torso(m) -> int:
    h = m.torso_hidden
    pe = 2 + 2 * 2 * 4
    return _mlp([pe + 12, h, h, 2]) + _hash(m.torso_levels, m.torso_features, 2) + \
        _mlp([m.torso_levels * m.torso_features + 12, h, h, 4])


def r2talker_sample(m) -> int:
    sigma = _mlp([m.pos_levels * m.pos_features] + [m.sigma_hidden] * (m.sigma_layers - 1) + [1 + m.geo_dim])
    color = _mlp([m.geo_dim + 3] + [m.color_hidden] * (m.color_layers - 1) + [3])
    maglo = 2 * m.sigma_hidden * (m.sigma_layers - 1) + 2 * m.color_hidden * (m.color_layers - 1)
    return _hash(m.pos_levels, m.pos_features) + sigma + color + (maglo if m.conditioning == "maglo" else 0)


def r2talker_frame(m) -> int:
    enc = m.window * 68 * _hash(m.lmk_levels, m.lmk_features)
    fcs = _mlp([m.window * 68 * m.lmk_levels * m.lmk_features] + [m.cond_hidden] * (m.cond_layers - 1) + [m.cond_dim])
    affine = 2 * m.cond_dim * 2 * (m.sigma_hidden * (m.sigma_layers - 1) + m.color_hidden * (m.color_layers - 1))
    return enc + fcs + affine


def meshhash_sample(m) -> int:
    """Per sample when rendering (merged tables)."""
    k, kc = m.knn_k, m.knn_candidates
    lf = m.hash_levels * m.hash_features
    search = (kc if m.knn == "grid" else 0) * 8          # distances to the cell's candidates
    local = k * (3 + 2 * 9)                              # q - v, then R^T (q - v)
    # rendering reads each neighbour's merged table (Eq. 1 is done per frame, meshhash_frame)
    tables = k * _hash(m.hash_levels, m.hash_features)
    blend = k * (lf * 2 + 6)                             # Eq. 2
    pe = 3 * (1 + 2 * m.pos_bands)
    trunk = _mlp([lf + m.feature_dim + pe] + [m.mlp_hidden] * m.mlp_layers + [1])
    rgb = _mlp([m.mlp_hidden + 3 * (1 + 2 * m.dir_bands), 3])
    return search + local + tables + blend + trunk + rgb


def meshhash_frame(model, n_anchors: int) -> tuple[int, int]:
    """(U-Net and per-anchor work, k-NN grid build) of one frame; the U-Net is counted by
    torch's FLOP counter on one forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    m = model.cfg
    x = torch.zeros(1, 3, m.uv_size, m.uv_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.head.unet(x)
    unet = int(counter.get_total_flops())
    anchors = n_anchors * (3 * 9 * 2)                    # tangent frames (normals, Gram-Schmidt), roughly
    entries = model.head.tables.tables[0, 0].numel()
    anchors += n_anchors * m.n_blend * entries * 2       # Eq. 1: the merged tables of the frame
    build = 0
    if m.knn == "grid":
        build = m.knn_resolution ** 3 * n_anchors * 8    # every cell centre against every anchor
    return unet + anchors, build


def frame_flops(model, samples: int, pixels: int, torso: bool = True) -> dict:
    """GFLOPs of one frame: per-sample, per-frame and torso parts and the total."""
    m = model.cfg
    if getattr(model, "kind", "r2talker") == "meshhash":
        per_sample = meshhash_sample(m)
        per_frame, build = meshhash_frame(model, model.head.anchors.n_anchors)
    else:
        per_sample, per_frame, build = r2talker_sample(m), r2talker_frame(m), 0
    parts = {"samples": samples * per_sample, "frame": per_frame, "knn_build": build,
             "torso": pixels * _torso(m) if torso else 0}
    out = {f"gflops_{k}": round(v / 1e9, 4) for k, v in parts.items()}
    out["gflops"] = round(sum(parts.values()) / 1e9, 4)
    out["samples_per_frame"] = samples
    return out

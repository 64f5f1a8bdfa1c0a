"""iBUG 68 landmarks from the face-alignment package's 2D FAN, without the package.

The user may put the TorchScript archive that face-alignment (>= 1.3) downloads, e.g.
``2DFAN4-cd938726ad.zip``, in the ``face_alignment`` model directory (see ``talkcli.models``). It is
loaded with ``torch.jit.load``; face-alignment itself is never imported.

Conventions reproduced from face-alignment (``face_alignment/api.py`` and ``face_alignment/utils.py``):

* face box ``(x0, y0, x1, y1)`` -> centre = box centre moved up by 0.12 of the box height,
  scale = (width + height) / 195 (195 is the S3FD detector's reference scale). The crop side in
  image pixels is ``h = 200 * scale``.
* point transform image -> crop of ``res`` pixels: ``q = (p - centre) * res / h + res / 2``.
* crop: the image window between the (truncated to int) inverse transforms of crop points (1, 1)
  and (res, res), zero padded outside the image, bilinearly resized to ``res x res``.
* network input: RGB, (B, 3, 256, 256), float in [0, 1]; output heatmaps (B, 68, 64, 64).
* heatmap decoding: argmax per heatmap; if the peak is not on the border, move a quarter pixel
  towards the higher neighbour on each axis; then express it in a frame where heatmap pixel
  column ``c`` spans [c, c + 1) (index + 0.5); map back with the inverse transform at res 64.

One deliberate difference: face-alignment truncates the final image coordinates to integers;
here they stay float.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from ..errors import InputError, MissingModel

REFERENCE_SCALE = 195.0  # S3FD's reference scale in face-alignment
CENTER_SHIFT = 0.12  # the crop centre sits this fraction of the box height above the box centre
INPUT_RES = 256
HEATMAP_RES = 64
EXPECTED_FILE = "2DFAN4-cd938726ad.zip"


def _default_dir() -> Path:
    from ..models import OPTIONAL_MODELS, model_dir

    return model_dir(next(m for m in OPTIONAL_MODELS if m.name == "face_alignment"))


def find_fan(directory_or_file=None) -> Path:
    """The 2D FAN archive: the file itself, or ``2DFAN4*.zip`` (else ``2DFAN*.zip``) in the directory."""
    path = Path(directory_or_file) if directory_or_file is not None else _default_dir()
    if path.is_file():
        return path
    if path.is_dir():
        for pattern in ("2DFAN4*.zip", "2DFAN*.zip"):
            found = sorted(p for p in path.glob(pattern) if p.is_file())
            if found:
                return found[-1]
    where = path if path.suffix.lower() != ".zip" else path.parent
    raise MissingModel(
        f"face-alignment landmarks need the 2D FAN TorchScript archive {EXPECTED_FILE} "
        f"(any 2DFAN4*.zip) in {where}: copy it from ~/.cache/torch/hub/checkpoints after "
        f"face-alignment downloaded it, or set TALKCLI_FACE_ALIGNMENT to its directory"
    )


def load_fan(directory_or_file=None, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """Load the 2D FAN TorchScript module (eval mode) from a models directory or an archive file."""
    path = find_fan(directory_or_file)
    try:
        model = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # torch raises RuntimeError / ValueError for corrupt archives
        raise InputError(f"cannot load the FAN model {path}: not a readable TorchScript archive ({exc})") from exc
    model.eval()
    return model


def face_box_from_mesh(points478: np.ndarray) -> tuple[float, float, float, float]:
    """A face box like face-alignment's S3FD detector gives, from mediapipe's 478 landmarks.

    Approximation (no second detector): S3FD boxes run roughly ear to ear and from the middle of
    the forehead to just below the chin. Horizontally the box is the extent of the whole mesh
    (its oval reaches the cheeks in front of the ears); vertically it starts a quarter of the way
    from the mesh's forehead top (landmark 10) down to the brows and ends 5 % of the face height
    below the chin (landmark 152). FAN re-centres and rescales from the box, so a few percent of
    disagreement with S3FD moves the crop a little but does not change what the network sees
    much; it is not an exact substitute.
    """
    p = np.asarray(points478, np.float64)[:, :2]
    x0, x1 = float(p[:, 0].min()), float(p[:, 0].max())
    top = float(p[10, 1])
    brows = float(np.mean(p[[105, 66, 334, 296], 1]))
    chin = float(p[152, 1])
    y0 = top + 0.25 * (brows - top)
    y1 = chin + 0.05 * (chin - top)
    return x0, y0, x1, y1


def crop_params(box) -> tuple[np.ndarray, float]:
    """(centre, scale) for a face box (x0, y0, x1, y1), as face-alignment computes them."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    center = np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0 - CENTER_SHIFT * (y1 - y0)])
    scale = ((x1 - x0) + (y1 - y0)) / REFERENCE_SCALE
    return center, float(scale)


def transform_points(pts, center, scale: float, res: float, invert: bool = False) -> np.ndarray:
    """Image -> crop coordinates for a ``res``-pixel crop (``invert=True``: crop -> image). Float."""
    pts = np.asarray(pts, np.float64)
    c = np.asarray(center, np.float64)
    h = 200.0 * scale
    if invert:
        return (pts - res / 2.0) * (h / res) + c
    return (pts - c) * (res / h) + res / 2.0


def crop(image: np.ndarray, center, scale: float, res: int = INPUT_RES) -> np.ndarray:
    """The ``res x res`` crop face-alignment feeds FAN, zero outside the image.

    Same window and sampling as face-alignment's crop (integer window corners, then a bilinear
    resize whose pixel centres map as ``src = corner + (dst + 0.5) * size / res - 0.5``), done in
    one ``cv2.warpAffine``.
    """
    ul = np.trunc(transform_points([1.0, 1.0], center, scale, res, invert=True))
    br = np.trunc(transform_points([float(res), float(res)], center, scale, res, invert=True))
    sx, sy = (br - ul) / float(res)
    # dst -> src affine (used with WARP_INVERSE_MAP)
    m = np.array([[sx, 0.0, ul[0] + 0.5 * sx - 0.5],
                  [0.0, sy, ul[1] + 0.5 * sy - 0.5]], np.float64)
    return cv2.warpAffine(image, m, (int(res), int(res)), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def decode_heatmaps(hm) -> np.ndarray:
    """(B, N, H, W) heatmaps -> (B, N, 2) float32 (x, y) in heatmap coordinates.

    Argmax, a quarter-pixel step towards the higher neighbour on each axis (peaks not on the border),
    and the +0.5 that puts pixel column ``c`` at [c, c + 1) - face-alignment's convention.
    """
    hm = hm.detach().float().cpu().numpy() if isinstance(hm, torch.Tensor) else np.asarray(hm, np.float32)
    b, n, h, w = hm.shape
    flat = hm.reshape(b, n, h * w)
    idx = flat.argmax(axis=2)
    col = (idx % w).astype(np.int64)
    row = (idx // w).astype(np.int64)
    preds = np.stack([col, row], axis=-1).astype(np.float32)
    inside = (col > 0) & (col < w - 1) & (row > 0) & (row < h - 1)
    bi, ni = np.nonzero(inside)
    if len(bi):
        r, c = row[bi, ni], col[bi, ni]
        dx = hm[bi, ni, r, c + 1] - hm[bi, ni, r, c - 1]
        dy = hm[bi, ni, r + 1, c] - hm[bi, ni, r - 1, c]
        preds[bi, ni, 0] += 0.25 * np.sign(dx)
        preds[bi, ni, 1] += 0.25 * np.sign(dy)
    return preds + 0.5


class FanLandmarks:
    """``ibug68_model`` for ``landmarks.track``: (rgb, points478) -> (68, 2) float32 image pixels."""

    def __init__(self, directory_or_file=None, device: str | torch.device | None = None, model=None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model if model is not None else load_fan(directory_or_file, self.device)

    def _heatmaps(self, crops: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(crops.transpose(0, 3, 1, 2))).to(self.device).float()
        x = x.div_(255.0)
        with torch.inference_mode():
            out = self.model(x)
        if isinstance(out, (list, tuple)):  # older FAN exports return one tensor per hourglass
            out = out[-1]
        return out

    def batch(self, rgbs, points478s) -> np.ndarray:
        """(B, 68, 2) float32 for B frames and their mediapipe landmarks (one forward pass)."""
        params, crops = [], []
        for rgb, pts in zip(rgbs, points478s):
            center, scale = crop_params(face_box_from_mesh(pts))
            params.append((center, scale))
            img = rgb if rgb.dtype == np.uint8 else np.clip(rgb, 0, 255).astype(np.uint8)
            if img.ndim == 2:
                img = np.repeat(img[:, :, None], 3, axis=2)
            crops.append(crop(img[:, :, :3], center, scale, INPUT_RES))
        if not crops:
            return np.zeros((0, 68, 2), np.float32)
        hm = self._heatmaps(np.stack(crops))
        pts = decode_heatmaps(hm)
        res = hm.shape[-1]
        return np.stack([transform_points(p, c, s, res, invert=True) for p, (c, s) in zip(pts, params)]
                        ).astype(np.float32)

    def __call__(self, rgb: np.ndarray, points478: np.ndarray) -> np.ndarray:
        return self.batch([rgb], [points478])[0]

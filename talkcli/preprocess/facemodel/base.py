"""The face-model interface: what every fit (built-in or FLAME) produces.

Conventions (all fits):
- Camera: OpenCV pinhole, x right, y down, z forward, pixels of the workspace frames
  (size x size). A head point X (metres, head frame) maps to the camera as R @ X + t and projects
  to u = fx * Xc / Zc + cx, v = fy * Yc / Zc + cy.
- Head frame: metres, origin near the centre of the head, x to the subject's left (image right
  when facing the camera), y down, z away from the camera when the head faces it (so that the
  neutral pose is R = I).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class FaceFit:
    model: str  # "builtin" or "flame"
    rotation: np.ndarray  # (N, 3, 3) float32 head -> camera
    translation: np.ndarray  # (N, 3) float32 metres
    expression: np.ndarray  # (N, E) float32 expression coefficients
    shape: np.ndarray  # (S,) float32 identity coefficients (empty for the built-in model)
    focal: float  # pixels (fx = fy)
    cx: float
    cy: float
    landmarks3d: np.ndarray  # (N, 478, 3) float32 fitted landmarks in the head frame (pose removed)
    projected: np.ndarray  # (N, 478, 2) float32 fitted landmarks projected to the image, pixels
    ok: np.ndarray  # (N,) bool: frames the fit used (tracked)
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # model-specific arrays


def project(points: np.ndarray, rotation: np.ndarray, translation: np.ndarray, focal: float, cx: float,
            cy: float) -> np.ndarray:
    """(N, P, 3) head-frame points -> (N, P, 2) pixels."""
    cam = np.einsum("nij,npj->npi", rotation, points) + translation[:, None, :]
    z = np.maximum(cam[..., 2:3], 1e-6)
    return np.concatenate([focal * cam[..., 0:1] / z + cx, focal * cam[..., 1:2] / z + cy], axis=-1)

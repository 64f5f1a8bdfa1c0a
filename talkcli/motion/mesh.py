"""The whole face mesh (478 points) of a motion track, for avatars driven by the mesh (meshhash).

Tracks carry 68 landmarks (what R2-Talker reads). The built-in face model of the workspace is
linear, ``mesh = neutral + e @ basis``, so a track's landmarks give expression coefficients by a
ridge-regularised least-squares fit of the basis' 68 landmark rows, and those give every vertex.
Cross-reenactment (``--from``) needs no fit: the other subject's per-vertex displacements from
its own neutral face, scaled by the ratio of face widths, are added to this subject's neutral
(both meshes share the topology).
"""

from __future__ import annotations

import numpy as np

from ..artifacts import workspace_npz
from ..errors import InputError
from ..workspace import Workspace


def _model(ws: Workspace, fit=None):
    """(neutral, basis) of the workspace's built-in face model (``fit``: its facefit.npz, when loaded)."""
    fit = workspace_npz(ws, "facefit.npz") if fit is None else fit
    if str(fit["model"]) != "builtin" or "basis" not in fit:
        raise InputError(f"{ws.root}: the meshhash avatar is driven through the built-in face model "
                         "(rerun `talk preprocess` without --flame)")
    return fit["neutral"].astype(np.float64), fit["basis"].astype(np.float64)


def mesh_from_landmarks(ws: Workspace, landmarks: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """(T, 68, 3) landmarks in the subject's head frame -> (T, 478, 3) meshes of its face model."""
    from ..preprocess.facemodel.mesh import IBUG68

    neutral, basis = _model(ws)
    a = basis[:, IBUG68].reshape(len(basis), -1)                # (K, 204)
    b = (landmarks.reshape(len(landmarks), -1) - neutral[IBUG68].reshape(1, -1))  # (T, 204)
    coeff = np.linalg.solve(a @ a.T + ridge * np.eye(len(a)), a @ b.T).T         # (T, K)
    return (neutral[None] + np.einsum("tk,kpd->tpd", coeff, basis)).astype(np.float32)


def transfer_mesh(ws: Workspace, other: Workspace, scale: float) -> np.ndarray:
    """(T, 478, 3) the other subject's tracked expressions on this subject's face, whose face width
    is ``scale`` (metres; ``audio2motion.face_scale`` of its tracked landmarks)."""
    from ..avatar.data import tracked_landmarks
    from .audio2motion import face_scale

    neutral, _ = _model(ws)
    fit = workspace_npz(other, "facefit.npz")
    other_neutral, _ = _model(other, fit)
    other_mesh, ok = tracked_landmarks(fit, np.arange(fit["landmarks3d"].shape[1]))
    idx68 = workspace_npz(other, "landmarks.npz")["ibug68_index"].astype(np.int64)
    ratio = scale / face_scale(other_mesh[ok][:, idx68])
    return (neutral[None] + (other_mesh - other_neutral[None]) * ratio).astype(np.float32)

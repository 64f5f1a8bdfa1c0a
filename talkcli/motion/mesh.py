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

from ..errors import InputError
from ..workspace import Workspace


def _model(ws: Workspace):
    fit = np.load(ws.path("facefit.npz"))
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


def transfer_mesh(ws: Workspace, other: Workspace) -> np.ndarray:
    """(T, 478, 3) the other subject's tracked expressions on this subject's face."""
    from ..avatar.data import subject_landmarks, tracked_landmarks
    from .audio2motion import face_scale

    neutral, _ = _model(ws)
    other_neutral, _ = _model(other)
    fit = np.load(other.path("facefit.npz"))
    other_mesh, _ = tracked_landmarks(fit, np.arange(fit["landmarks3d"].shape[1]))
    own, ok = subject_landmarks(ws)
    theirs, their_ok = subject_landmarks(other)
    ratio = face_scale(own[ok]) / face_scale(theirs[their_ok])
    return (neutral[None] + (other_mesh - other_neutral[None]) * ratio).astype(np.float32)

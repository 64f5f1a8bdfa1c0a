"""Topology of the built-in face model: MediaPipe's 468-vertex face mesh (+10 iris points).

The mediapipe wheel ships the mesh connectivity (``FACEMESH_TESSELATION``, an edge set) but not the
canonical model file, so the triangles are recovered here: every 3-clique of the edge graph is a
candidate face; in this planar mesh only two 3-cliques are not faces ("separating" triangles whose
three edges each border three candidates), and those are dropped. That leaves 852 triangles; with
468 vertices and 1322 edges the Euler characteristic is -2, a disk with three holes (the eyes and
the mouth), as the mesh looks. Winding is made consistent by orienting every face towards the
camera in a frontal shape.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import numpy as np

N_MESH = 468  # face mesh vertices; indices 468..477 are the iris points of refined landmarks
N_LANDMARKS = 478

# iBUG 68-point subset of mediapipe's 478 landmarks: jaw (17), brows (5+5), nose bridge (4),
# nostrils (5), eyes (6+6), outer lips (12), inner lips (8), in iBUG order.
IBUG68 = np.array([
    162, 234, 93, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 323, 454, 389,
    71, 63, 105, 66, 107, 336, 296, 334, 293, 301,
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
    78, 82, 13, 312, 308, 317, 14, 87,
], dtype=np.int64)

# Points that move with the skull, not with expressions: forehead, nose bridge and tip, the
# face contour at the temples and cheekbones, and the inner/outer eye corners.
STABLE = np.array([
    10, 151, 9, 8, 109, 338, 67, 297, 103, 332,  # forehead
    168, 6, 197, 195, 5, 4, 1,  # nose bridge and tip
    127, 356, 234, 454, 93, 323, 162, 389, 21, 251, 54, 284,  # temples, upper contour
    33, 133, 362, 263,  # eye corners
], dtype=np.int64)

IRIS_CENTRES = (468, 473)  # centre of the subject's right / left iris in refined landmarks


@functools.lru_cache(maxsize=1)
def edges() -> np.ndarray:
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_TESSELATION

    return np.array(sorted({tuple(sorted(e)) for e in FACEMESH_TESSELATION}), dtype=np.int64)


@functools.lru_cache(maxsize=1)
def _raw_triangles() -> np.ndarray:
    nb: dict[int, set[int]] = defaultdict(set)
    for a, b in edges():
        nb[int(a)].add(int(b))
        nb[int(b)].add(int(a))
    tris = set()
    for a, b in edges():
        for c in nb[int(a)] & nb[int(b)]:
            tris.add(tuple(sorted((int(a), int(b), c))))
    per_edge: dict[tuple[int, int], int] = defaultdict(int)
    for t in tris:
        for e in ((t[0], t[1]), (t[1], t[2]), (t[0], t[2])):
            per_edge[e] += 1
    faces = [t for t in tris
             if not all(per_edge[e] > 2 for e in ((t[0], t[1]), (t[1], t[2]), (t[0], t[2])))]
    return np.array(sorted(faces), dtype=np.int64)


def triangles(frontal: np.ndarray) -> np.ndarray:
    """(852, 3) faces wound so that their normals point at the camera (-z) in ``frontal`` (468+, 3)."""
    tris = _raw_triangles().copy()
    n = face_normals(frontal, tris)
    flip = n[:, 2] > 0
    tris[flip] = tris[flip][:, [0, 2, 1]]
    return tris


def face_normals(points: np.ndarray, tris: np.ndarray) -> np.ndarray:
    a, b, c = points[tris[:, 0]], points[tris[:, 1]], points[tris[:, 2]]
    return np.cross(b - a, c - a)


def visible_vertices(points: np.ndarray, tris: np.ndarray) -> np.ndarray:
    """(478,) bool: a mesh vertex is visible when one of its faces points at the camera.

    Points are in image-aligned axes (x right, y down, z away from the camera). Iris points take
    the visibility of their eye's corner vertices.
    """
    n = face_normals(points, tris)
    facing = n[:, 2] < 0
    vis = np.zeros(N_LANDMARKS, bool)
    for k in range(3):
        np.logical_or.at(vis, tris[facing, k], True)
    vis[468:473] = vis[33] or vis[133]
    vis[473:478] = vis[362] or vis[263]
    return vis


def uv_layout(neutral: np.ndarray) -> np.ndarray:
    """(478, 2) UV in [0, 1] by a cylindrical projection of the neutral shape about the vertical axis.

    The face spans well under 180° of the cylinder, so the projection is one seamless chart.
    """
    p = neutral - neutral[:N_MESH].mean(axis=0)
    radius_axis_z = p[:, 2] - p[:, 2].max() - 0.5 * (p[:, 0].max() - p[:, 0].min())  # axis behind the face
    theta = np.arctan2(p[:, 0], -radius_axis_z)
    u = (theta - theta.min()) / max(np.ptp(theta), 1e-9)
    v = (p[:, 1] - p[:, 1].min()) / max(np.ptp(p[:, 1]), 1e-9)
    margin = 0.02
    return (margin + (1 - 2 * margin) * np.stack([u, v], axis=1)).astype(np.float32)

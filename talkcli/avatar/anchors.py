"""The anchor mesh of the mesh-anchored avatar: where its per-vertex hash tables sit, per frame.

The paper anchors tables on 1772 Poisson-disk-subsampled FLAME vertices + 10 iris points. The
built-in face model is MediaPipe's 468-vertex face mesh + 10 iris points; one midpoint
subdivision (a vertex on each of its 1322 edges) gives 1790 + 10 = 1800 face anchors, about the
paper's density. That mesh covers the face only, so a **head proxy** is added: points on an
ellipsoid shell around the head (inside the head box R2-Talker renders), spaced
``proxy_spacing`` apart, minus those over the face. They move rigidly with the head (they are
fixed in the pose-normalised head frame), so hair, ears and the back of the head get tables too,
while the face anchors follow the tracked expression.

Every anchor has a tangent frame (tangent, bitangent, normal as the columns of a rotation): face
anchors from the per-frame vertex normals of the mesh and the direction to a fixed neighbour,
proxy anchors from the ellipsoid's normal. A sample's coordinates in an anchor's frame are
``R^T (q - v)``; ``q = v + R local`` inverts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..preprocess.facemodel.mesh import N_LANDMARKS, N_MESH, edges as mesh_edges

IRIS = np.arange(N_MESH, N_LANDMARKS)


@dataclass
class AnchorLayout:
    """Topology of the anchors, fixed for a subject: ``V = 478 + E + P`` anchors.

    ``edges`` (E, 2): the subdivided edges (their midpoints are anchors 478..478+E); ``neighbour``
    (478 + E,): the vertex each face anchor's tangent points to; ``proxy`` (P, 3) and
    ``proxy_normal`` (P, 3): the head shell in the head frame; ``triangles`` (T, 3): the face mesh.
    """

    triangles: np.ndarray
    edges: np.ndarray
    neighbour_a: np.ndarray  # (478 + E,) tangent from vertex a ...
    neighbour_b: np.ndarray  # ... towards vertex b (both indices of the 478 mesh)
    proxy: np.ndarray
    proxy_normal: np.ndarray

    @property
    def n_face(self) -> int:
        return N_LANDMARKS + len(self.edges)

    @property
    def n_anchors(self) -> int:
        return self.n_face + len(self.proxy)


def build_layout(triangles: np.ndarray, meshes: np.ndarray, aabb: tuple[float, ...], subdivide: bool = True,
                 head_proxy: bool = True, spacing: float = 0.02) -> AnchorLayout:
    """The anchors of a subject from its face-mesh triangles, its training meshes (N, 478, 3) and
    its head box (R2-Talker's ``head_aabb``)."""
    e = mesh_edges() if subdivide else np.zeros((0, 2), np.int64)
    # each original vertex points its tangent at its first edge neighbour; iris points at another
    # iris point of the same eye; a midpoint along its edge
    nb = np.full(N_LANDMARKS, -1, np.int64)
    all_edges = mesh_edges()
    for a, b in all_edges[::-1]:  # reversed: the first listed neighbour wins
        nb[a], nb[b] = b, a
    nb[IRIS] = [469, 468, 468, 468, 468, 474, 473, 473, 473, 473]
    neighbour_a = np.concatenate([np.arange(N_LANDMARKS), e[:, 0]])
    neighbour_b = np.concatenate([nb, e[:, 1]])
    mean = np.nanmean(meshes, axis=0)
    if head_proxy:
        proxy, normal = _head_shell(mean, aabb, spacing)
    else:
        proxy, normal = np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32)
    return AnchorLayout(triangles.astype(np.int64), e.astype(np.int64), neighbour_a, neighbour_b,
                        proxy.astype(np.float32), normal.astype(np.float32))


def _head_shell(face: np.ndarray, aabb: tuple[float, ...], spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Points on the ellipsoid inscribed in the head box (shrunk 5%), about ``spacing`` apart
    (a Fibonacci lattice), without those over the face: within 1.5 spacings of a face vertex, or
    in front of the face's back edge inside its outline seen from the camera."""
    lo, hi = np.asarray(aabb[:3], np.float64), np.asarray(aabb[3:], np.float64)
    c, r = 0.5 * (lo + hi), 0.475 * (hi - lo)
    a, b, cc = r
    p = 1.6075  # Knud Thomsen's approximation of an ellipsoid's area
    area = 4 * np.pi * (((a * b) ** p + (a * cc) ** p + (b * cc) ** p) / 3) ** (1 / p)
    n = max(8, int(round(area / spacing ** 2)))
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5 ** 0.5) * i
    unit = np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)
    pts = c + unit * r
    normal = unit / r  # gradient of the implicit ellipsoid
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    fv = face[:N_MESH]
    d = np.sqrt(((pts[:, None, :] - fv[None]) ** 2).sum(-1)).min(axis=1)
    from matplotlib.path import Path as Outline

    from scipy.spatial import ConvexHull

    hull = fv[ConvexHull(fv[:, :2]).vertices, :2]
    centre = hull.mean(axis=0)
    outline = Outline(centre + 0.9 * (hull - centre))
    over_face = outline.contains_points(pts[:, :2]) & (pts[:, 2] < fv[:, 2].max())
    keep = (d > 1.5 * spacing) & ~over_face
    return pts[keep], normal[keep]


class Anchors(torch.nn.Module):
    """Per-frame anchor positions and tangent frames (torch, batched over frames)."""

    def __init__(self, layout: AnchorLayout):
        super().__init__()
        self.n_face = layout.n_face
        self.register_buffer("triangles", torch.from_numpy(layout.triangles), persistent=False)
        self.register_buffer("edges", torch.from_numpy(layout.edges), persistent=False)
        self.register_buffer("nb_a", torch.from_numpy(layout.neighbour_a), persistent=False)
        self.register_buffer("nb_b", torch.from_numpy(layout.neighbour_b), persistent=False)
        self.register_buffer("proxy", torch.from_numpy(layout.proxy), persistent=False)
        self.register_buffer("proxy_frames", _frames(torch.from_numpy(layout.proxy_normal),
                                                     torch.tensor([1.0, 0.0, 0.0]).expand(len(layout.proxy), 3)),
                             persistent=False)

    @property
    def n_anchors(self) -> int:
        return self.n_face + int(self.proxy.shape[0])

    def positions(self, mesh: torch.Tensor) -> torch.Tensor:
        """(B, 478, 3) meshes -> (B, V, 3) anchors: the vertices, the edge midpoints, the proxy."""
        b = mesh.shape[0]
        mid = 0.5 * (mesh[:, self.edges[:, 0]] + mesh[:, self.edges[:, 1]])
        return torch.cat([mesh, mid, self.proxy.expand(b, -1, -1)], dim=1)

    def frames(self, mesh: torch.Tensor) -> torch.Tensor:
        """(B, 478, 3) meshes -> (B, V, 3, 3) rotations whose columns are tangent, bitangent, normal."""
        b = mesh.shape[0]
        n = vertex_normals(mesh, self.triangles)
        n_mid = n[:, self.edges[:, 0]] + n[:, self.edges[:, 1]]
        normals = torch.cat([n, n_mid], dim=1)
        towards_camera = torch.tensor([0.0, 0.0, -1.0], dtype=mesh.dtype)
        bad = normals.norm(dim=-1, keepdim=True) < 1e-9  # iris points belong to no triangle
        normals = torch.where(bad, towards_camera, normals)
        start = torch.cat([mesh, 0.5 * (mesh[:, self.edges[:, 0]] + mesh[:, self.edges[:, 1]])], dim=1)
        tangent = mesh[:, self.nb_b] - start
        face = _frames(normals.reshape(-1, 3), tangent.reshape(-1, 3)).reshape(b, -1, 3, 3)
        return torch.cat([face, self.proxy_frames.expand(b, -1, -1, -1)], dim=1)


def vertex_normals(mesh: torch.Tensor, triangles: torch.Tensor) -> torch.Tensor:
    """(B, 478, 3) area-weighted vertex normals (unnormalised; zero for vertices in no triangle)."""
    v0, v1, v2 = (mesh[:, triangles[:, k]] for k in range(3))
    fn = torch.cross(v1 - v0, v2 - v0, dim=-1)
    out = torch.zeros_like(mesh)
    for k in range(3):
        out.index_add_(1, triangles[:, k], fn)
    return out


def _frames(normal: torch.Tensor, tangent_hint: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) rotations [t, b, n] from normals and a tangent direction (Gram-Schmidt; when the
    hint is parallel to the normal, the x or y axis stands in)."""
    n = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    t = tangent_hint - (tangent_hint * n).sum(-1, keepdim=True) * n
    weak = t.norm(dim=-1, keepdim=True) < 1e-6 * tangent_hint.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    for axis in (torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])):
        alt = axis.to(n) - (axis.to(n) * n).sum(-1, keepdim=True) * n
        t = torch.where(weak, alt, t)
        weak = t.norm(dim=-1, keepdim=True) < 1e-6
    t = t / t.norm(dim=-1, keepdim=True)
    bt = torch.cross(n, t, dim=-1)
    return torch.stack([t, bt, n], dim=-1)


def to_local(q: torch.Tensor, origin: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """Coordinates of points ``q`` (..., 3) in anchor frames (origin (..., 3), frame (..., 3, 3))."""
    return torch.einsum("...ji,...j->...i", frame, q - origin)


def to_world(local: torch.Tensor, origin: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_local``."""
    return origin + torch.einsum("...ij,...j->...i", frame, local)


def face_uv(uv478: np.ndarray, layout: AnchorLayout) -> np.ndarray:
    """(478 + E, 2) UV of the face anchors: the mesh's own, and edge midpoints' the mean of their ends'."""
    mid = 0.5 * (uv478[layout.edges[:, 0]] + uv478[layout.edges[:, 1]])
    return np.concatenate([uv478, mid]).astype(np.float32)

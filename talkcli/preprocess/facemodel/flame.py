"""FLAME, when the user supplies it: a restricted loader, linear blend skinning in torch, and a fit
of FLAME's shape, expression, jaw, neck and head pose to MediaPipe landmarks.

FLAME's ``generic_model.pkl`` is a Python 2 pickle whose arrays are chumpy objects. Unpickling it
the ordinary way would import chumpy (unmaintained, broken on current numpy) and, like any pickle,
lets the file run code. :func:`load_flame` instead allows only the classes a FLAME file is made
of (numpy arrays, scipy sparse matrices, chumpy arrays, replaced by inert stand-ins) and refuses
everything else before it is called.

Axes: FLAME's own frame is y up, z out of the face (toward a camera it looks at). The FaceFit head
frame (see ``base.py``) is y down, z into the face, so a head frame point is ``FLAME_TO_HEAD @``
a FLAME point. Everything FLAME-specific in ``FaceFit.extra`` stays in FLAME's frame.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch

from ... import models
from ...errors import InputError, MissingModel
from .base import FaceFit

MODEL_FILE = "generic_model.pkl"
EMBEDDING_FILE = "mediapipe_landmark_embedding.npz"
N_MEDIAPIPE = 478
FLAME_SHAPE_COLUMNS = 300  # FLAME 2020/2023: shapedirs[..., :300] is identity, the rest expression
FLAME_TO_HEAD = np.diag([1.0, -1.0, -1.0])  # 180 degrees about x: y up/z out -> y down/z in
_ROOT_PARENT = 4294967295  # kintree_table's "no parent" (uint32 -1)


# --------------------------------------------------------------------------------------------
# Restricted unpickling


class _StateCapture:
    """An inert object that only records the state a pickle gives it."""

    def __new__(cls, *args, **kwargs):  # NEWOBJ passes the class only; REDUCE may pass anything
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        self.state = None

    def __setstate__(self, state):
        self.state = state


class _ChumpyStandIn(_StateCapture):
    """Takes the place of any chumpy class: keeps the pickled state, runs nothing.

    chumpy pickles ``__dict__`` minus its weak references, so a plain ``Ch`` carries its value
    under ``'x'``; derived objects (``Select``, ``Reshape``, ...) carry their operands instead.
    """

    pickled_class = "chumpy.ch.Ch"

    def to_array(self) -> np.ndarray:
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = state[1]  # (slots, dict) form
        if isinstance(state, np.ndarray) or np.isscalar(state):
            return np.asarray(state)
        if not isinstance(state, dict):
            raise ValueError(f"{self.pickled_class} holds no array")
        if "x" in state:
            return _to_array(state["x"])
        return self._derived(state)

    def _derived(self, state: dict) -> np.ndarray:
        """The few chumpy views FLAME-family files are known to use; all pure reindexing."""
        kind = self.pickled_class.rsplit(".", 1)[-1]
        if "a" not in state:
            raise ValueError(f"{self.pickled_class} is a chumpy expression, not an array")
        a = _to_array(state["a"])
        if kind == "Select":
            out = a.ravel()[np.asarray(state["idxs"]).ravel()]
            return out.reshape(state["preferred_shape"]) if "preferred_shape" in state else out
        if kind == "Reshape":
            return a.reshape(state["newshape"])
        if kind == "transpose":
            return np.ascontiguousarray(np.transpose(a, state.get("axes")))
        raise ValueError(f"{self.pickled_class} is a chumpy expression that talkcli cannot evaluate")


class _SparseStandIn(_StateCapture):
    """Takes the place of a scipy CSC/CSR matrix: old and new scipy pickle the same three arrays
    under different module paths and attribute names, so rebuild the matrix from them."""

    sparse_format = "csc"

    def to_array(self) -> np.ndarray:
        import scipy.sparse as sp

        s = self.state if isinstance(self.state, dict) else {}
        shape = s.get("_shape", s.get("shape"))
        if shape is None or not all(k in s for k in ("data", "indices", "indptr")):
            raise ValueError("sparse matrix without data/indices/indptr/shape")
        build = sp.csc_matrix if self.sparse_format == "csc" else sp.csr_matrix
        return build((s["data"], s["indices"], s["indptr"]), shape=tuple(shape)).toarray()


def _stand_in(base: type, module: str, name: str, **attrs) -> type:
    return type(name, (base,), {"__module__": __name__, **attrs, "pickled_class": f"{module}.{name}"})


def _numpy_callables() -> dict[str, object]:
    """numpy's own pickle helpers, found through numpy itself (their module moved in numpy 2)."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    scalar = np.float64(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    return {"_reconstruct": reconstruct, "scalar": scalar, "_frombuffer": frombuffer}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only data classes; any other global (os.system, eval, ...) stops the load."""

    _NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                      "numpy._core.numeric")
    _SPARSE = {"csc_matrix": "csc", "csc_array": "csc", "csr_matrix": "csr", "csr_array": "csr"}
    _BUILTINS = {"set": set, "frozenset": frozenset}

    def __init__(self, file, source: str):
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str):
        module, name = _python3_name(module, name)
        if module.split(".")[0] == "chumpy":
            return _stand_in(_ChumpyStandIn, module, name)
        if module in self._NUMPY_MODULES and name in _numpy_callables():
            return _numpy_callables()[name]
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module.startswith("scipy.sparse") and name in self._SPARSE:
            return _stand_in(_SparseStandIn, module, name, sparse_format=self._SPARSE[name])
        if module == "builtins" and name in self._BUILTINS:
            return self._BUILTINS[name]
        if module == "_codecs" and name == "encode":  # how Python 3 protocol-2 pickles store bytes
            import _codecs

            return _codecs.encode
        raise InputError(f"{self.source}: talkcli refuses to load this pickle: the pickle asks for "
                         f"{module}.{name}, which a FLAME model never contains (only numpy arrays, "
                         f"scipy sparse matrices and chumpy arrays are allowed)")


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Python 2 pickles name some globals by their Python 2 homes (``__builtin__``,
    ``copy_reg``, ``commands``...): judge and report them by where they live now."""
    import _compat_pickle

    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _to_array(value) -> np.ndarray:
    if isinstance(value, (_ChumpyStandIn, _SparseStandIn)):
        return value.to_array()
    return np.asarray(value)


# --------------------------------------------------------------------------------------------
# Loading


def _missing(path: Path, what: str) -> MissingModel:
    flame = next(m for m in models.OPTIONAL_MODELS if m.name == "flame")
    return MissingModel(
        f"FLAME {what} not found: {path}. Put {', '.join(flame.files)} (from {flame.source}) in "
        f"{models.model_dir(flame)}, set {flame.env} to the directory that holds them, or pass --flame PATH"
    )


def _resolve_paths(model_path, embedding_path) -> tuple[Path, Path]:
    if model_path is None:
        model_path = models.require("flame") / MODEL_FILE
    model_path = Path(model_path)
    if model_path.is_dir():
        model_path = model_path / MODEL_FILE
    if embedding_path is None:
        embedding_path = model_path.parent / EMBEDDING_FILE
    embedding_path = Path(embedding_path)
    if not model_path.is_file():
        raise _missing(model_path, f"model file {MODEL_FILE}")
    if not embedding_path.is_file():
        raise _missing(embedding_path, f"landmark embedding {EMBEDDING_FILE}")
    return model_path, embedding_path


def _read_pickle(path: Path) -> dict:
    try:
        data = _RestrictedUnpickler(io.BytesIO(path.read_bytes()), path.name).load()
    except InputError:
        raise
    except Exception as exc:  # truncated, not a pickle, wrong protocol, ...
        raise InputError(f"cannot read FLAME model {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a FLAME model: the pickle holds a {type(data).__name__}, not a dict")
    return data


def _array(data: dict, key: str, source: str, ndim: int) -> np.ndarray:
    if key not in data:
        raise InputError(f"{source} is not a FLAME model: it has no '{key}'")
    try:
        arr = _to_array(data[key])
    except Exception as exc:  # a chumpy expression, a malformed sparse matrix, a cycle, ...
        raise InputError(f"{source}: cannot read '{key}': {exc}") from None
    if arr.ndim != ndim or arr.dtype.kind not in "fiu":
        raise InputError(f"{source}: '{key}' has shape {arr.shape} ({arr.dtype}); a FLAME model has a "
                         f"{ndim}-d numeric array there")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{source}: '{key}' has non-finite values")
    return arr


def _check_shape(arr: np.ndarray, expected: tuple, key: str, source: str) -> None:
    if any(e is not None and a != e for a, e in zip(arr.shape, expected)):
        want = "x".join("*" if e is None else str(e) for e in expected)
        raise InputError(f"{source}: '{key}' has shape {arr.shape}, expected {want}")


def _parents(kintree: np.ndarray, source: str) -> list[int]:
    raw = kintree[0].astype(np.int64)
    parents = [-1 if (p == _ROOT_PARENT or p < 0) else int(p) for p in raw]
    if parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(parents) if i > 0):
        raise InputError(f"{source}: 'kintree_table' is not a kinematic tree in parent-first order: {raw}")
    return parents


def _read_embedding(path: Path, n_faces: int) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            emb = {k: np.asarray(npz[k]) for k in npz.files}
    except Exception as exc:
        raise InputError(f"cannot read FLAME landmark embedding {path}: {type(exc).__name__}: {exc}") from None
    for key in ("lmk_face_idx", "lmk_b_coords", "landmark_indices"):
        if key not in emb:
            raise InputError(f"{path} is not a FLAME mediapipe embedding: it has no '{key}'")
    faces, bary, idx = emb["lmk_face_idx"].ravel(), emb["lmk_b_coords"], emb["landmark_indices"].ravel()
    k = len(faces)
    if bary.shape != (k, 3) or len(idx) != k:
        raise InputError(f"{path}: 'lmk_b_coords' {bary.shape} / 'landmark_indices' {idx.shape} do not match "
                         f"'lmk_face_idx' ({k},)")
    if faces.min(initial=0) < 0 or faces.max(initial=0) >= n_faces:
        raise InputError(f"{path}: 'lmk_face_idx' points past the model's {n_faces} faces")
    if idx.min(initial=0) < 0 or idx.max(initial=0) >= N_MEDIAPIPE or len(set(idx.tolist())) != k:
        raise InputError(f"{path}: 'landmark_indices' must be distinct indices into MediaPipe's {N_MEDIAPIPE} points")
    if not np.all(np.isfinite(bary)):
        raise InputError(f"{path}: 'lmk_b_coords' has non-finite values")
    return {"lmk_face_idx": faces.astype(np.int64), "lmk_b_coords": bary.astype(np.float64),
            "landmark_indices": idx.astype(np.int64)}


def load_flame(model_path: str | Path | None = None, embedding_path: str | Path | None = None, *,
               n_shape: int = 300, n_expr: int = 100, shape_columns: int | None = None) -> "FlameModel":
    """Load FLAME's ``generic_model.pkl`` and its MediaPipe landmark embedding without chumpy.

    ``model_path`` may be the pickle or its directory; ``None`` looks in the configured FLAME model
    directory (``talkcli.models``). ``embedding_path`` defaults to the pickle's directory.
    ``shape_columns`` is where expression starts in ``shapedirs``: 300 for FLAME (the default when
    the file has more than 300 columns); smaller test files default to their first two thirds.
    ``n_shape`` / ``n_expr`` keep the leading components of each part, clipped to what the file holds.
    A pickle that asks for anything but numpy, scipy sparse and chumpy classes is refused
    (InputError) before that class is called.
    """
    model_path, embedding_path = _resolve_paths(model_path, embedding_path)
    data = _read_pickle(model_path)
    src = model_path.name
    v_template = _array(data, "v_template", src, 2)
    n_verts = v_template.shape[0]
    _check_shape(v_template, (None, 3), "v_template", src)
    shapedirs = _array(data, "shapedirs", src, 3)
    _check_shape(shapedirs, (n_verts, 3, None), "shapedirs", src)
    kintree = _array(data, "kintree_table", src, 2)
    _check_shape(kintree, (2, 5), "kintree_table", src)
    parents = _parents(kintree, src)
    posedirs = _array(data, "posedirs", src, 3)
    _check_shape(posedirs, (n_verts, 3, 9 * (len(parents) - 1)), "posedirs", src)
    j_regressor = _array(data, "J_regressor", src, 2)
    _check_shape(j_regressor, (len(parents), n_verts), "J_regressor", src)
    weights = _array(data, "weights", src, 2)
    _check_shape(weights, (n_verts, len(parents)), "weights", src)
    faces = _array(data, "f", src, 2)
    _check_shape(faces, (None, 3), "f", src)
    if faces.min() < 0 or faces.max() >= n_verts:
        raise InputError(f"{src}: 'f' indexes past the {n_verts} vertices")

    total = shapedirs.shape[2]
    split = shape_columns if shape_columns is not None else (
        FLAME_SHAPE_COLUMNS if total > FLAME_SHAPE_COLUMNS else (2 * total) // 3)
    if not 0 < split < total:
        raise InputError(f"{src}: 'shapedirs' has {total} columns, so shape/expression cannot split at {split}")
    n_shape, n_expr = max(0, min(n_shape, split)), max(0, min(n_expr, total - split))
    emb = _read_embedding(embedding_path, len(faces))
    return FlameModel.from_arrays(
        v_template=v_template, shapedirs=shapedirs[:, :, :n_shape],
        exprdirs=shapedirs[:, :, split:split + n_expr], posedirs=posedirs, j_regressor=j_regressor,
        weights=weights, parents=parents, faces=faces, **emb)


# --------------------------------------------------------------------------------------------
# The model


def rodrigues(rvec: torch.Tensor) -> torch.Tensor:
    """Axis-angle (..., 3) -> rotation matrices (..., 3, 3).

    R = I + a [r]x + b (r r^T - t^2 I) with t = |r|, a = sin t / t and b = (1 - cos t) / t^2
    written as 2 sin^2(t/2) / t^2 (no cancellation in float32); near t = 0 their Taylor series
    keep value and gradient finite at the zero pose every fit starts from.
    """
    theta2 = (rvec * rvec).sum(-1)[..., None, None]
    small = theta2 < 1e-12
    safe2 = torch.where(small, torch.ones_like(theta2), theta2)
    theta = safe2.sqrt()
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, 2.0 * torch.sin(theta / 2.0) ** 2 / safe2)
    x, y, z = rvec.unbind(-1)
    zero = torch.zeros_like(x)
    cross = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*rvec.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=rvec.dtype, device=rvec.device)
    outer = rvec[..., :, None] * rvec[..., None, :]
    return eye + a * cross + b * (outer - theta2 * eye)


def _mat_vec(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(..., 3, n) @ (..., n) elementwise: batched 3x3 matmuls are far slower as bmm on CPU."""
    return (m * v[..., None, :]).sum(-1)


def _mat_mat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a[..., :, :, None] * b[..., None, :, :]).sum(-2)


def _rigid_transforms(rot: torch.Tensor, joints: torch.Tensor, parents: list[int]) -> torch.Tensor:
    """Per-joint skinning transforms (B, J, 3, 4) along the kinematic chain, as in FLAME's LBS.

    Each joint rotates about its rest position; the chain composes parent-first, and the rest
    position is subtracted at the end so the transforms apply to rest-pose vertices.
    """
    rel = torch.cat([joints[:, :1], joints[:, 1:] - joints[:, parents[1:]]], dim=1)
    chain_r, chain_t = [rot[:, 0]], [rel[:, 0]]
    for i in range(1, len(parents)):
        p = parents[i]
        chain_r.append(_mat_mat(chain_r[p], rot[:, i]))
        chain_t.append(_mat_vec(chain_r[p], rel[:, i]) + chain_t[p])
    world_r, world_t = torch.stack(chain_r, 1), torch.stack(chain_t, 1)
    t = world_t - _mat_vec(world_r, joints)
    return torch.cat([world_r, t[..., None]], dim=-1)


@dataclasses.dataclass
class _Part:
    """The model restricted to some vertices, with each basis laid out (L, V'*3) for one matmul."""

    template: torch.Tensor  # (V', 3)
    shape_t: torch.Tensor  # (S, V'*3)
    expr_t: torch.Tensor  # (E, V'*3)
    pose_t: torch.Tensor  # (36, V'*3)
    weights: torch.Tensor  # (V', 5)


@dataclasses.dataclass
class FlameModel:
    """FLAME's arrays as float32 tensors, and its forward pass (linear blend skinning).

    ``posedirs`` is (36, V*3) as FLAME's LBS uses it; ``shapedirs`` / ``exprdirs`` are the
    identity and expression parts of the file's shapedirs. Joints are linear in the coefficients,
    so ``J_regressor`` applied to the template and to each blendshape is kept precomputed
    (``joints_template``, ``joints_shape``, ``joints_expr``): that is what lets the fit skin only
    the few vertices the landmarks sit on.
    """

    v_template: torch.Tensor  # (V, 3)
    shapedirs: torch.Tensor  # (V, 3, S)
    exprdirs: torch.Tensor  # (V, 3, E)
    posedirs: torch.Tensor  # (36, V*3)
    j_regressor: torch.Tensor  # (5, V)
    weights: torch.Tensor  # (V, 5)
    parents: list[int]
    faces: torch.Tensor  # (F, 3) int64
    lmk_face_idx: torch.Tensor  # (K,) int64
    lmk_b_coords: torch.Tensor  # (K, 3)
    landmark_indices: np.ndarray  # (K,) indices into MediaPipe's 478 points
    joints_template: torch.Tensor  # (5, 3)
    joints_shape: torch.Tensor  # (S, 15): joint motion per shape coefficient
    joints_expr: torch.Tensor  # (E, 15)
    _parts: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_arrays(cls, *, v_template, shapedirs, exprdirs, posedirs, j_regressor, weights, parents, faces,
                    lmk_face_idx, lmk_b_coords, landmark_indices) -> "FlameModel":
        f32 = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
        n_verts = v_template.shape[0]
        joint_dirs = lambda d: np.einsum("jv,vkl->ljk", j_regressor, d).reshape(d.shape[2], -1)  # noqa: E731
        return cls(
            v_template=f32(v_template), shapedirs=f32(shapedirs), exprdirs=f32(exprdirs),
            posedirs=f32(np.reshape(posedirs, (n_verts * 3, -1)).T), j_regressor=f32(j_regressor),
            weights=f32(weights), parents=list(parents), faces=torch.as_tensor(faces.astype(np.int64)),
            lmk_face_idx=torch.as_tensor(lmk_face_idx), lmk_b_coords=f32(lmk_b_coords),
            landmark_indices=np.asarray(landmark_indices, dtype=np.int64),
            joints_template=f32(j_regressor @ v_template), joints_shape=f32(joint_dirs(shapedirs)),
            joints_expr=f32(joint_dirs(exprdirs)),
        )

    @property
    def n_shape(self) -> int:
        return self.shapedirs.shape[2]

    @property
    def n_expr(self) -> int:
        return self.exprdirs.shape[2]

    @property
    def n_verts(self) -> int:
        return self.v_template.shape[0]

    def _part(self, name: str, ids: torch.Tensor | None) -> _Part:
        if name not in self._parts:
            sel = slice(None) if ids is None else ids
            flat = lambda d: d[sel].permute(2, 0, 1).reshape(d.shape[2], -1).contiguous()  # noqa: E731
            pose = self.posedirs.reshape(-1, self.n_verts, 3)[:, sel].reshape(self.posedirs.shape[0], -1)
            self._parts[name] = _Part(self.v_template[sel], flat(self.shapedirs), flat(self.exprdirs),
                                      pose.contiguous(), self.weights[sel])
        return self._parts[name]

    def _landmark_support(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The vertices the landmark faces use, and each landmark's corners as indices into them."""
        return torch.unique(self.faces[self.lmk_face_idx], return_inverse=True)

    @staticmethod
    def _padded(value, n: int, what: str) -> torch.Tensor:
        """Coefficients zero-padded to the model's count: callers may use fewer leading ones."""
        value = torch.as_tensor(value, dtype=torch.float32)
        if value.shape[-1] > n:
            raise ValueError(f"{what} has {value.shape[-1]} coefficients; the model holds {n}")
        return torch.nn.functional.pad(value, (0, n - value.shape[-1]))

    def _pose(self, global_pose, neck_pose, jaw_pose, eye_pose, batch: int) -> torch.Tensor:
        """FLAME's full pose (B, 5, 3): global, neck, jaw, left eye, right eye."""
        eye = torch.zeros(batch, 6) if eye_pose is None else torch.as_tensor(eye_pose, dtype=torch.float32)
        parts = [torch.as_tensor(p, dtype=torch.float32).reshape(batch, 3) for p in (global_pose, neck_pose, jaw_pose)]
        return torch.cat(parts + [eye.reshape(batch, 6)], dim=1).reshape(batch, 5, 3)

    def _lbs(self, shape, expr, pose: torch.Tensor, part: _Part) -> torch.Tensor:
        """FLAME's linear blend skinning of the part's vertices (exact for any subset).

        shape may be (S,), shared by the batch, or (B, S); expr is (B, E); pose (B, 5, 3).
        """
        batch = pose.shape[0]
        shape, expr = self._padded(shape, self.n_shape, "shape"), self._padded(expr, self.n_expr, "expr")
        v_shaped = (part.template + (shape @ part.shape_t).reshape(*shape.shape[:-1], -1, 3)
                    + (expr @ part.expr_t).reshape(batch, -1, 3))
        joints = (self.joints_template + (shape @ self.joints_shape).reshape(*shape.shape[:-1], -1, 3)
                  + (expr @ self.joints_expr).reshape(batch, -1, 3))
        rot = rodrigues(pose)
        pose_feature = (rot[:, 1:] - torch.eye(3)).flatten(1)
        v_posed = v_shaped + (pose_feature @ part.pose_t).reshape(batch, -1, 3)
        transforms = _rigid_transforms(rot, joints.expand(batch, -1, -1), self.parents)
        per_vertex = (part.weights @ transforms.reshape(batch, len(self.parents), 12)).reshape(batch, -1, 3, 4)
        return _mat_vec(per_vertex[..., :3], v_posed) + per_vertex[..., 3]

    def forward(self, shape, expr, global_pose, neck_pose, jaw_pose, eye_pose=None) -> torch.Tensor:
        """Posed vertices (B, V, 3) in FLAME's frame. shape (B, S) or (S,), expr (B, E), poses
        (B, 3) axis-angle, eye_pose (B, 6) (zero when None). Fewer coefficients than the model
        holds are zero-padded."""
        batch = torch.as_tensor(global_pose).reshape(-1, 3).shape[0]
        pose = self._pose(global_pose, neck_pose, jaw_pose, eye_pose, batch)
        return self._lbs(shape, expr, pose, self._part("all", None))

    __call__ = forward

    def landmarks(self, vertices: torch.Tensor) -> torch.Tensor:
        """The embedded landmarks (B, K, 3) of posed vertices (B, V, 3): barycentric points on faces.
        Landmark k is MediaPipe point ``landmark_indices[k]``."""
        corners = vertices[:, self.faces[self.lmk_face_idx]]  # (B, K, 3 corners, 3)
        return (corners * self.lmk_b_coords[None, :, :, None]).sum(2)

    def posed_landmarks(self, shape, expr, global_pose, neck_pose, jaw_pose, eye_pose=None) -> torch.Tensor:
        """Same as ``landmarks(forward(...))`` but skins only the vertices the landmarks need."""
        batch = torch.as_tensor(global_pose).reshape(-1, 3).shape[0]
        ids, local = self._landmark_support()
        pose = self._pose(global_pose, neck_pose, jaw_pose, eye_pose, batch)
        verts = self._lbs(shape, expr, pose, self._part("landmarks", ids))
        return (verts[:, local] * self.lmk_b_coords[None, :, :, None]).sum(2)

    def joints(self, shape, expr) -> torch.Tensor:
        """Rest-pose joints (B, 5, 3) = J_regressor @ shaped vertices; expr is (B, E)."""
        shape, expr = self._padded(shape, self.n_shape, "shape"), self._padded(expr, self.n_expr, "expr")
        return (self.joints_template + (shape @ self.joints_shape).reshape(*shape.shape[:-1], -1, 3)
                + (expr @ self.joints_expr).reshape(expr.shape[0], -1, 3))


# --------------------------------------------------------------------------------------------
# Fitting FLAME to a landmark sequence

HEAD_RADIUS = 0.1  # metres: turns angle changes into displacements, to weigh them against pixels


@dataclasses.dataclass(frozen=True)
class FlameFitWeights:
    """Prior and smoothness weights, relative to the data term (the per-frame mean of squared
    landmark errors in pixels), per squared coefficient or squared radian, per frame. The shape
    prior too is divided by the number of frames: each frame is more evidence about the one
    identity, so a long sequence may pull the shape further from the mean than one frame can.

    Neck and global rotation move the face landmarks the same way up to the pivot, which the
    translation absorbs; the strong neck prior puts the head's rotation into the global pose.
    """

    shape: float = 1e-2
    expr: float = 1e-2
    jaw: float = 1.0
    neck: float = 1e3
    smooth: float = 1e-3  # consecutive-frame pose differences, as pixel displacements
    robust: float = 0.01  # pseudo-Huber scale, as a fraction of the image size


def _observations(lms478: np.ndarray, ok: np.ndarray, model: FlameModel):
    """The embedded landmarks' pixels (N, K, 2), which of them are finite, and the usable frames."""
    lms = np.asarray(lms478, dtype=np.float64)
    if lms.ndim != 3 or lms.shape[1] != N_MEDIAPIPE or lms.shape[2] not in (2, 3):
        raise ValueError(f"landmarks must be (N, {N_MEDIAPIPE}, 2 or 3), got {lms.shape}")
    ok = np.asarray(ok, dtype=bool).reshape(-1)
    if len(ok) != len(lms):
        raise ValueError(f"ok has {len(ok)} entries for {len(lms)} frames")
    pts = lms[:, model.landmark_indices, :2]
    seen = np.isfinite(pts).all(-1)
    used = ok & (seen.sum(1) >= max(6, len(model.landmark_indices) // 2))
    return np.nan_to_num(pts), seen, used


def _initial_poses(obj: np.ndarray, pts: np.ndarray, seen: np.ndarray, focal: float, c: np.ndarray):
    """Per-frame rigid pose of the mean-shape landmarks by PnP: the fit then starts within a few
    degrees. A frame PnP cannot solve starts facing the camera at the depth its spread implies."""
    import cv2

    cam = np.array([[focal, 0, c[0]], [0, focal, c[1]], [0, 0, 1]], dtype=np.float64)
    rvecs, tvecs = np.zeros((len(pts), 3)), np.zeros((len(pts), 3))
    spread3d = np.linalg.norm(obj[:, :2] - obj[:, :2].mean(0), axis=1).mean()
    for i in range(len(pts)):
        m = seen[i]
        okay, rvec, tvec = cv2.solvePnP(obj[m], pts[i, m], cam, None, flags=cv2.SOLVEPNP_SQPNP)
        if okay and tvec[2, 0] > 0:
            rvecs[i], tvecs[i] = rvec[:, 0], tvec[:, 0]
            continue
        centre = pts[i, m].mean(0)
        spread2d = max(np.linalg.norm(pts[i, m] - centre, axis=1).mean(), 1e-3)
        z = focal * spread3d / spread2d
        tvecs[i] = [(centre[0] - c[0]) * z / focal, (centre[1] - c[1]) * z / focal, z]
    return rvecs, tvecs


_POSE_KEYS = (("rvec", 3), ("pix", 2), ("log_zeta", 1), ("jaw", 3), ("neck", 3))  # per frame, before expr
_N_POSE = sum(width for _, width in _POSE_KEYS)
_FLIP = torch.tensor([1.0, -1.0, -1.0])  # FLAME_TO_HEAD as a per-axis factor


class _SequenceFit:
    """The fit's parameters, loss and Levenberg-Marquardt solver, for the M frames with landmarks.

    Translation is parametrised as the head origin's pixel offset from the principal point and
    zeta = depth / focal. Changing the focal at fixed (offset, zeta) then moves the head along its
    line of sight so its image keeps its place and size: focal only explains perspective.

    Why Levenberg-Marquardt: every frame has its own shallow valleys (jaw against expression,
    neck against global pose), and first-order methods over all frames at once (Adam, L-BFGS)
    crawl through thousands of them. Gauss-Newton sees each frame's curvature exactly. The
    per-frame blocks (pose, jaw, neck, expression) only couple through the shared shape and focal,
    so each step eliminates the blocks frame by frame and solves a small system for the shared
    part (Schur complement): linear in the number of frames.
    """

    def __init__(self, model: FlameModel, pts, seen, frames, rvec0, t0, focal0: float, fit_focal: bool,
                 n_shape: int, n_expr: int, centre, image_size: int, weights: FlameFitWeights):
        f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        m = len(frames)
        self.model, self.w, self.fit_focal = model, weights, fit_focal
        self.pts, self.seen = f32(pts), f32(seen)
        self.n_seen = self.seen.sum(1)
        self.centre = f32(centre)
        self.robust = weights.robust * image_size
        self.pair = torch.as_tensor(np.flatnonzero(np.diff(frames) == 1))  # smooth only adjacent frames
        zeta0 = t0[:, 2] / focal0
        self.p = {
            "rvec": f32(rvec0), "pix": f32(t0[:, :2] / zeta0[:, None]), "log_zeta": f32(np.log(zeta0)[:, None]),
            "jaw": torch.zeros(m, 3), "neck": torch.zeros(m, 3), "expr": torch.zeros(m, n_expr),
            "shape": torch.zeros(n_shape), "log_f": f32([np.log(focal0)]),
        }
        self._linear_parts(n_shape, n_expr)

    # -- the model of the landmarks -------------------------------------------------------------

    def _linear_parts(self, n_shape: int, n_expr: int) -> None:
        """Constants of the landmarks' derivative in the coefficients. Skinned points are linear
        in [shape, expr] for fixed rotations: through the blendshapes each joint's rotation
        carries, and through the joints' positions (the joint regressor's blendshapes)."""
        model = self.model
        ids, local = model._landmark_support()
        corners = ids[local]  # (K, 3) vertex of each corner
        dirs = torch.cat([model.shapedirs[:, :, :n_shape], model.exprdirs[:, :, :n_expr]], dim=2)
        per_corner = model.lmk_b_coords[:, :, None] * model.weights[corners]  # (K, 3 corners, J)
        self.lmk_weights = per_corner.sum(1)  # (K, J): joint weights of each landmark
        ebar = torch.einsum("kcj,kcbl->jbkl", per_corner, dirs[corners])  # (J, 3, K, L)
        self.ebar = ebar.reshape(ebar.shape[0] * 3, -1)  # (J*3, K*L)
        self.joint_dirs = torch.cat([model.joints_shape[:n_shape], model.joints_expr[:n_expr]]).T  # (J*3, L)

    def _camera(self, p: dict, idx):
        """Camera-space landmarks (C, K, 3), head rotations (C, 3, 3) and focal of frames idx."""
        jaw = p["jaw"][idx]
        lm = self.model.posed_landmarks(p["shape"], p["expr"][idx], torch.zeros_like(jaw), p["neck"][idx], jaw)
        rot = rodrigues(p["rvec"][idx])
        focal = p["log_f"].exp().reshape(-1, 1)  # (1, 1), or (C, 1) for the Jacobian's copies
        zeta = p["log_zeta"][idx].exp()
        t = torch.cat([p["pix"][idx] * zeta, focal * zeta], dim=1)
        return _mat_vec(rot[:, None], lm * _FLIP) + t[:, None], rot, focal

    def project(self, p: dict, idx=slice(None)) -> torch.Tensor:
        cam, _, focal = self._camera(p, idx)
        return focal[..., None] * cam[..., :2] / cam[..., 2:].clamp(min=1e-3) + self.centre

    def translation(self, p: dict) -> torch.Tensor:
        zeta = p["log_zeta"].exp()
        return torch.cat([p["pix"] * zeta, p["log_f"].exp() * zeta], dim=1)

    # -- the loss --------------------------------------------------------------------------------

    def _rho(self, r2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-Huber of squared residuals (~r2 below the scale) and its derivative in r2."""
        root = torch.sqrt(1 + r2 / self.robust ** 2)
        return 2 * self.robust ** 2 * (root - 1), 1 / root

    def data_loss(self, p: dict) -> torch.Tensor:
        r2 = ((self.project(p) - self.pts) ** 2).sum(-1)
        return ((self._rho(r2)[0] * self.seen).sum(1) / self.n_seen).mean()

    def regularisers(self, p: dict) -> torch.Tensor:
        w, m = self.w, len(self.pts)
        sq = lambda k: (p[k] ** 2).sum()  # noqa: E731
        priors = (w.shape * sq("shape") + w.expr * sq("expr") + w.jaw * sq("jaw") + w.neck * sq("neck")) / m
        return priors + w.smooth * self.smoothness(p)

    def loss(self, p: dict) -> torch.Tensor:
        return self.data_loss(p) + self.regularisers(p)

    def _lever(self, p: dict) -> torch.Tensor:
        """Pixels per radian at each smoothed pair (treated as constant)."""
        return (HEAD_RADIUS / p["log_zeta"].exp()).detach()[self.pair]

    def smoothness(self, p: dict) -> torch.Tensor:
        """Consecutive-frame changes of pose as image motion (pixels), squared: rotations move
        points HEAD_RADIUS from the pivot, the head origin moves by its pixel offset, and a depth
        change rescales the head's image. Measured in the image, not in metres, so that the
        penalty does not favour a shorter focal (which shrinks every depth change)."""
        if len(self.pair) == 0:
            return torch.zeros(())
        i, lever = self.pair, self._lever(p)
        step = lambda k: p[k][i + 1] - p[k][i]  # noqa: E731
        d2 = sum(((step(k) * lever) ** 2).sum(-1) for k in ("rvec", "jaw", "neck", "log_zeta"))
        return (d2 + (step("pix") ** 2).sum(-1)).sum() / len(self.pts)

    def _regulariser_curvature(self, p: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Second derivatives of ``regularisers``: diagonal per frame (M, P) and shared (G,), and
        the smoothness coupling of each frame with the next (M-1, P), zero where not adjacent."""
        w, m = self.w, len(self.pts)
        n_expr = p["expr"].shape[1]
        per_frame = torch.zeros(m, 12 + n_expr)
        per_frame[:, 6:9] = 2 * w.jaw / m
        per_frame[:, 9:12] = 2 * w.neck / m
        per_frame[:, 12:] = 2 * w.expr / m
        couple = torch.zeros(max(m - 1, 0), 12 + n_expr)
        if len(self.pair):
            c = torch.ones(len(self.pair), 12) * 2 * w.smooth / m
            c[:, [0, 1, 2, 5, 6, 7, 8, 9, 10, 11]] *= self._lever(p) ** 2  # angles and log depth
            couple[self.pair, :12] = -c
            per_frame[:, :12].index_add_(0, self.pair, c).index_add_(0, self.pair + 1, c)
        shared = torch.full((len(p["shape"]) + int(self.fit_focal),), 2 * w.shape / m)
        if self.fit_focal:
            shared[-1] = 0.0
        return per_frame, shared, couple

    # -- Jacobians -----------------------------------------------------------------------------

    def _pose_jacobian(self, p: dict, idx) -> torch.Tensor:
        """(C, K, 2, 12 [+1 for the focal]) by forward-mode differentiation in one pass: the
        frames are repeated once per direction, each copy carrying that direction's tangent
        (frames do not interact, so each copy's output tangent is one Jacobian column)."""
        import torch.autograd.forward_ad as fwad

        keys = _POSE_KEYS + ((("log_f", 1),) if self.fit_focal else ())
        dirs = [(key, d) for key, width in keys for d in range(width)]
        c = len(p["rvec"][idx])
        copies = {k: p[k][idx].repeat(len(dirs), 1) for k in ("rvec", "pix", "log_zeta", "jaw", "neck", "expr")}
        copies["log_f"] = p["log_f"].expand(c * len(dirs), 1)
        copies["shape"] = p["shape"]
        with warnings.catch_warnings(), fwad.dual_level():
            # torch's forward-mode set-up scripts helpers with the deprecated torch.jit.script
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
            dual = dict(copies)
            for key, width in keys:
                tangent = torch.zeros(c * len(dirs), width)
                for i, (k, d) in enumerate(dirs):
                    if k == key:
                        tangent[i * c:(i + 1) * c, d] = 1.0
                dual[key] = fwad.make_dual(copies[key].contiguous(), tangent)
            jac = fwad.unpack_dual(self.project(dual)).tangent
        return jac.reshape(len(dirs), c, *jac.shape[1:]).permute(1, 2, 3, 0)

    def _coeff_jacobian(self, p: dict, idx) -> torch.Tensor:
        """(C, K, 2, S+E): derivative of the projections in [shape, expr], from the linear
        structure (``_linear_parts``) rather than one differentiation per coefficient."""
        model = self.model
        jaw, neck, expr = p["jaw"][idx], p["neck"][idx], p["expr"][idx]
        c, n_joints = len(jaw), len(model.parents)
        pose = torch.zeros(c, n_joints, 3)
        pose[:, 1], pose[:, 2] = neck, jaw
        rot = rodrigues(pose)
        world_r = _rigid_transforms(rot, model.joints(p["shape"], expr).expand(c, -1, -1), model.parents)[..., :3]
        # joints move the skinning translations linearly: probe with each joint coordinate
        probes = torch.eye(n_joints * 3).reshape(-1, n_joints, 3)
        probed = _rigid_transforms(rot.repeat_interleave(len(probes), 0), probes.repeat(c, 1, 1), model.parents)
        sens = probed[..., 3].reshape(c, len(probes), n_joints * 3).transpose(1, 2)  # (C, J*3, J*3)
        k = len(self.lmk_weights)
        via_dirs = (world_r.permute(0, 2, 1, 3).reshape(c * 3, -1) @ self.ebar).reshape(c, 3, k, -1)
        via_joints = (sens @ self.joint_dirs).reshape(c, n_joints, -1)  # (C, J, 3*L)
        via_joints = (self.lmk_weights @ via_joints).reshape(c, k, 3, -1)
        flame_d = via_dirs.permute(0, 2, 1, 3) + via_joints  # (C, K, 3, L) in FLAME's frame
        cam, head_rot, focal = self._camera(p, idx)
        x, y, z = cam.unbind(-1)
        zero = torch.zeros_like(z)
        d_proj = torch.stack([1 / z, zero, -x / z ** 2, zero, 1 / z, -y / z ** 2], -1).reshape(c, k, 2, 3)
        to_pixels = focal[..., None] * _mat_mat(d_proj, head_rot[:, None]) * _FLIP  # (C, K, 2, 3)
        return to_pixels @ flame_d

    # -- Levenberg-Marquardt ----------------------------------------------------------------

    def _normal_equations(self, p: dict, chunk: int) -> dict:
        """Gauss-Newton blocks of the loss: per frame H_ff (M, P, P), H_fg (M, P, G), g_f (M, P);
        shared H_gg (G, G), g_g (G,). The data term uses IRLS weights of the pseudo-Huber."""
        m = len(self.pts)
        h_ff, h_fg, g_f, h_gg, g_g = [], [], [], 0.0, 0.0
        n_shape = len(p["shape"])
        for start in range(0, m, chunk):
            idx = torch.arange(start, min(start + chunk, m))
            with torch.no_grad():
                resid = self.project(p, idx) - self.pts[idx]
                weight = self._rho((resid ** 2).sum(-1))[1] * self.seen[idx] / self.n_seen[idx, None] / m
                j_pose = self._pose_jacobian(p, idx)
                j_coef = self._coeff_jacobian(p, idx)
            # products in float32 (the Jacobians are float32 anyway), sums and solves in float64
            local = torch.cat([j_pose[..., :_N_POSE], j_coef[..., n_shape:]], dim=-1).flatten(1, 2)
            shared = torch.cat([j_coef[..., :n_shape], j_pose[..., _N_POSE:]], dim=-1).flatten(1, 2)
            w2 = (2 * weight).repeat_interleave(2, dim=1)[..., None]  # (C, 2K, 1)
            local_t, shared_w = local.transpose(1, 2), w2 * shared
            h_ff.append((local_t @ (w2 * local)).double())
            h_fg.append((local_t @ shared_w).double())
            g_f.append((local_t @ (w2 * resid.flatten(1)[..., None]))[..., 0].double())
            h_gg = h_gg + (shared.transpose(1, 2) @ shared_w).double().sum(0)
            g_g = g_g + (shared_w.transpose(1, 2) @ resid.flatten(1)[..., None])[..., 0].double().sum(0)
        eq = {"h_ff": torch.cat(h_ff), "h_fg": torch.cat(h_fg), "g_f": torch.cat(g_f), "h_gg": h_gg, "g_g": g_g}
        # priors and smoothness: exact gradient, diagonal curvature
        leaves = {k: v.detach().requires_grad_() for k, v in p.items()}
        grads = torch.autograd.grad(self.regularisers(leaves), [leaves[k] for k in leaves], allow_unused=True)
        grad = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}
        eq["g_f"] += torch.cat([grad[k] for k, _ in _POSE_KEYS] + [grad["expr"]], dim=1).double()
        eq["g_g"] += torch.cat([grad["shape"]] + ([grad["log_f"]] if self.fit_focal else [])).double()
        per_frame, shared_c, couple = self._regulariser_curvature(p)
        eq["h_ff"] += torch.diag_embed(per_frame.double())
        eq["couple"] = couple.double()
        eq["h_gg"] = eq["h_gg"] + torch.diag(shared_c.double())
        eq["rhs"] = torch.cat([eq["g_f"][..., None], eq["h_fg"]], dim=2)  # what the frames' solve takes
        return eq

    @staticmethod
    def _solve_chain(blocks: torch.Tensor, couple: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor | None:
        """Solve the block-tridiagonal system (diagonal blocks (M, n, n), the block between frames
        i and i+1 the diagonal matrix ``couple[i]``) for rhs (M, n, R) by block elimination along
        the sequence (Thomas algorithm); None if a block is not positive definite."""
        if not couple.any():  # nothing couples the frames: all blocks at once
            chol, info = torch.linalg.cholesky_ex(blocks)
            return None if info.any() else torch.cholesky_solve(rhs, chol)
        chols, reduced = [], []
        for i in range(len(blocks)):
            block, r = blocks[i], rhs[i]
            if i and couple[i - 1].any():
                o = couple[i - 1]
                block = block - o[:, None] * torch.cholesky_solve(torch.diag(o), chols[-1])
                r = r - o[:, None] * torch.cholesky_solve(reduced[-1], chols[-1])
            chol, info = torch.linalg.cholesky_ex(block)
            if info:
                return None
            chols.append(chol)
            reduced.append(r)
        out = [torch.cholesky_solve(reduced[-1], chols[-1])]
        for i in range(len(blocks) - 2, -1, -1):
            out.append(torch.cholesky_solve(reduced[i] - couple[i][:, None] * out[-1], chols[i]))
        return torch.stack(out[::-1])

    @classmethod
    def _solve_frames(cls, blocks: torch.Tensor, couple: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor | None:
        """Solve the frames' system (blocks (M, P, P), smoothness coupling (M-1, P), rhs (M, P, R)).
        Smoothness couples only the 12 pose parameters, so each frame's expression is eliminated
        first (all frames at once) and the sequential elimination runs on 12 x 12 blocks."""
        n = _N_POSE
        if blocks.shape[1] == n:
            return cls._solve_chain(blocks, couple, rhs)
        a, b, d = blocks[:, :n, :n], blocks[:, :n, n:], blocks[:, n:, n:]
        chol_d, info = torch.linalg.cholesky_ex(d)
        if info.any():
            return None
        d_inv = torch.cholesky_solve(torch.cat([b.transpose(1, 2), rhs[:, n:]], dim=2), chol_d)  # D^-1 [B^T R_d]
        x_pose = cls._solve_chain(a - b @ d_inv[..., :n], couple[:, :n], rhs[:, :n] - b @ d_inv[..., n:])
        if x_pose is None:
            return None
        return torch.cat([x_pose, d_inv[..., n:] - d_inv[..., :n] @ x_pose], dim=1)

    def _step(self, eq: dict, lam: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Damped Gauss-Newton step (local (M, P), shared (G,)): the frames' blocks are
        eliminated, the shared part solved from what remains (Schur complement); None if the
        system is not positive definite at this damping."""
        damp = lambda h: h + lam * torch.diag_embed(h.diagonal(dim1=-2, dim2=-1) + 1e-9)  # noqa: E731
        both = self._solve_frames(damp(eq["h_ff"]), eq["couple"], eq["rhs"])
        if both is None:
            return None
        y, x = both[..., 0], both[..., 1:]  # T^-1 g_f, T^-1 H_fg
        schur = damp(eq["h_gg"]) - (eq["h_fg"].transpose(1, 2) @ x).sum(0)
        rhs = eq["g_g"] - (eq["h_fg"].transpose(1, 2) @ y[..., None])[..., 0].sum(0)
        chol_s, info_s = torch.linalg.cholesky_ex(schur)
        if info_s:
            return None
        d_shared = -torch.cholesky_solve(rhs[:, None], chol_s)[:, 0]
        d_local = -y - (x @ d_shared[:, None])[..., 0]
        return d_local, d_shared

    def _apply(self, p: dict, d_local: torch.Tensor, d_shared: torch.Tensor) -> dict:
        out, col = dict(p), 0
        for key, width in _POSE_KEYS:
            out[key] = p[key] + d_local[:, col:col + width].float()
            col += width
        out["expr"] = p["expr"] + d_local[:, col:].float()
        n_shape = len(p["shape"])
        out["shape"] = p["shape"] + d_shared[:n_shape].float()
        if self.fit_focal:
            out["log_f"] = p["log_f"] + d_shared[n_shape:].float()
        return out

    def optimise(self, iters: int) -> None:
        """Levenberg-Marquardt: take a damped Gauss-Newton step if it lowers the loss (and trust
        the model more), else damp harder and retry."""
        p, lam = self.p, 1e-3
        n_local = 12 + p["expr"].shape[1]
        n_shared = len(p["shape"]) + int(self.fit_focal)
        chunk = max(8, 2_000_000 // (len(self.pts[0]) * (n_local + n_shared + 13)))
        with torch.no_grad():
            current = float(self.loss(p))
        for _ in range(iters):
            eq = self._normal_equations(p, chunk)
            for _ in range(10):
                step = self._step(eq, lam)
                trial = None if step is None else self._apply(p, *step)
                with torch.no_grad():
                    value = float(self.loss(trial)) if trial is not None else float("inf")
                if np.isfinite(value) and value < current:
                    break
                lam *= 4.0
            else:
                break  # no damping makes progress: converged
            gain = (current - value) / max(current, 1e-12)
            p, current, lam = trial, value, max(lam / 3.0, 1e-7)
            if gain < 1e-7:
                break
        self.p = p


@contextlib.contextmanager
def _threads_for(work: int):
    """One torch thread for short sequences: their tensors are so small that a second thread
    only adds synchronisation (measured 5 ms vs 20-120 ms per step for 40 frames on 2 cores)."""
    before = torch.get_num_threads()
    if work < 20_000:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fill_gaps(values: np.ndarray, frames: np.ndarray, n: int) -> np.ndarray:
    """(M, D) values at ``frames`` -> (n, D): linear in between, nearest beyond the ends."""
    everywhere = np.arange(n)
    return np.stack([np.interp(everywhere, frames, col) for col in values.T], axis=1)


def _fill_rotations(rvecs: np.ndarray, frames: np.ndarray, n: int) -> np.ndarray:
    """(M, 3) axis-angle at ``frames`` -> (n, 3, 3): slerp in between, nearest beyond the ends."""
    from scipy.spatial.transform import Rotation, Slerp

    rots = Rotation.from_rotvec(rvecs)
    if len(frames) == 1:
        return np.repeat(rots.as_matrix(), n, axis=0)
    times = np.clip(np.arange(n), frames[0], frames[-1])
    return Slerp(frames, rots)(times).as_matrix()


def fit_flame(lms478: np.ndarray, ok: np.ndarray, image_size: int, model: FlameModel, *,
              focal: float | None = None, iters: int = 30, n_shape: int | None = 100,
              n_expr: int | None = None, weights: FlameFitWeights | None = None) -> FaceFit:
    """Fit FLAME to MediaPipe landmarks (pixels, (N, 478, 2 or 3)) of a whole sequence at once.

    Shared: identity shape and (unless given) focal, which starts at 1.5 x image size; per
    frame: expression, jaw, neck, head rotation and translation. The principal point is the
    image centre. Frames with ``ok`` False (or too few finite landmarks) are interpolated from
    their neighbours and stay not ok. ``iters`` caps the Levenberg-Marquardt iterations (it
    usually converges in 5-15). ``n_shape`` / ``n_expr`` limit the components fitted (None: all the
    model holds); 100 identity components are the usual choice, as 105 landmarks do not
    determine more. Cost: about 40 ms and 0.6 MB per frame and iteration at 100 + 100 components.
    """
    weights = weights or FlameFitWeights()
    pts, seen, used = _observations(lms478, ok, model)
    if not used.any():
        raise InputError("FLAME fit: no frame has tracked landmarks")
    n, frames = len(used), np.flatnonzero(used)
    n_shape = model.n_shape if n_shape is None else min(n_shape, model.n_shape)
    n_expr = model.n_expr if n_expr is None else min(n_expr, model.n_expr)
    centre = np.array([image_size / 2.0, image_size / 2.0])
    focal0 = float(focal) if focal is not None else 1.5 * image_size

    with torch.no_grad():
        template = model.landmarks(model.v_template[None])[0].numpy().astype(np.float64) @ FLAME_TO_HEAD
    rvec0, t0 = _initial_poses(template, pts[frames], seen[frames], focal0, centre)
    problem = _SequenceFit(model, pts[frames], seen[frames], frames, rvec0, t0, focal0, focal is None,
                           n_shape, n_expr, centre, image_size, weights)
    with _threads_for(len(frames) * len(model.landmark_indices)):
        problem.optimise(iters)

    with torch.no_grad():
        p = {k: v.numpy().astype(np.float64) for k, v in problem.p.items()}
        translation = problem.translation(problem.p).numpy().astype(np.float64)
        residual = (problem.project(problem.p) - problem.pts).norm(dim=-1).numpy()
    focal_fit = focal0 if focal is not None else float(np.exp(p["log_f"][0]))
    return _assemble(model, n, frames, p, translation, focal_fit, centre, np.where(seen[frames], residual, np.nan))


def _assemble(model: FlameModel, n: int, frames: np.ndarray, p: dict, translation: np.ndarray, focal: float,
              centre: np.ndarray, residual: np.ndarray) -> FaceFit:
    """All n frames' FaceFit from the fitted frames' parameters (gaps interpolated)."""
    from scipy.spatial.transform import Rotation

    from .base import project

    rotation = _fill_rotations(p["rvec"], frames, n)
    translation = _fill_gaps(translation, frames, n)
    expr, jaw, neck = (_fill_gaps(p[k], frames, n) for k in ("expr", "jaw", "neck"))
    shape = p["shape"]
    with torch.no_grad():
        lm_flame = torch.cat([model.posed_landmarks(shape, e, torch.zeros(len(e), 3), nk, jw)
                              for e, nk, jw in zip(*(torch.as_tensor(a, dtype=torch.float32).split(1024)
                                                     for a in (expr, neck, jaw)))]).numpy()
        joints = model.joints(shape, torch.as_tensor(expr, dtype=torch.float32))[:, 0].numpy()
        dirs = model.shapedirs[:, :, :len(shape)].numpy()
        shaped = model.v_template.numpy() + dirs @ shape
    lm_head = lm_flame.astype(np.float64) @ FLAME_TO_HEAD
    idx = model.landmark_indices
    landmarks3d = np.full((n, N_MEDIAPIPE, 3), np.nan)
    landmarks3d[:, idx] = lm_head
    projected = np.full((n, N_MEDIAPIPE, 2), np.nan)
    projected[:, idx] = project(lm_head, rotation, translation, focal, centre[0], centre[1])
    # FLAME's own global pose and translation for the same placement: C (v_flame + transl) = camera.
    global_rot = FLAME_TO_HEAD @ rotation @ FLAME_TO_HEAD
    flame_transl = (np.einsum("nij,nj->ni", global_rot, joints) - joints) + translation @ FLAME_TO_HEAD
    used = np.zeros(n, dtype=bool)
    used[frames] = True
    per_frame_err = np.full(n, np.nan)
    per_frame_err[frames] = np.nanmean(residual, axis=1)
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    return FaceFit(
        model="flame", rotation=f32(rotation), translation=f32(translation), expression=f32(expr),
        shape=f32(shape), focal=focal, cx=float(centre[0]), cy=float(centre[1]),
        landmarks3d=f32(landmarks3d), projected=f32(projected), ok=used,
        extra={"jaw_pose": f32(jaw), "neck_pose": f32(neck),
               "global_pose": f32(Rotation.from_matrix(global_rot).as_rotvec()),
               "flame_transl": f32(flame_transl), "vertices_template_shaped": f32(shaped),
               "residual_px": f32(per_frame_err)},
    )

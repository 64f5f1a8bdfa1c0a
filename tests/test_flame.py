"""FLAME: restricted loading of a synthetic file in FLAME's exact layout, LBS, and a fit that must
recover known parameters.

The real FLAME files need registration, so the tests build a small one (a ~300-vertex ellipsoid
head) with the same keys, shapes, dtypes and chumpy/scipy classes in its pickle. chumpy itself is
not installed: a fake ``chumpy.ch`` module exists only while the pickle is written.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.spatial import ConvexHull
from scipy.spatial.transform import Rotation

from talkcli.errors import InputError, MissingModel
from talkcli.preprocess.facemodel.base import project
from talkcli.preprocess.facemodel.flame import FLAME_TO_HEAD, fit_flame, load_flame, rodrigues

N_SHAPE, N_EXPR, N_LMK = 20, 10, 105
RADII = np.array([0.075, 0.1, 0.09])  # x (ear to ear), y (chin to crown), z (back to nose), metres


# --------------------------------------------------------------------------------------------
# A synthetic FLAME file


def _sphere_points(n: int) -> np.ndarray:
    """Evenly spread unit vectors (Fibonacci lattice)."""
    i = np.arange(n) + 0.5
    y = 1 - 2 * i / n
    r = np.sqrt(1 - y * y)
    phi = np.pi * (3 - np.sqrt(5)) * i
    return np.stack([r * np.cos(phi), y, r * np.sin(phi)], axis=1)


def _smooth_fields(verts: np.ndarray, n: int, amplitude: float, rng) -> np.ndarray:
    """(V, 3, n) displacement fields, each a few Gaussian bumps of random direction."""
    out = np.zeros((len(verts), 3, n))
    for k in range(n):
        for _ in range(4):
            centre = verts[rng.integers(len(verts))]
            bump = np.exp(-((verts - centre) ** 2).sum(1) / (2 * 0.035 ** 2))
            out[:, :, k] += bump[:, None] * rng.normal(size=3) * amplitude
    return out


def _skinning(verts: np.ndarray):
    """FLAME-like joints (root, neck, jaw, eyes) and weights: Gaussian influence around anchors."""
    anchors = np.array([[0, -0.1, -0.01], [0, 0.0, 0.0], [0, -0.06, 0.06], [0.03, 0.025, 0.08],
                        [-0.03, 0.025, 0.08]])
    sigma = np.array([0.04, 0.08, 0.035, 0.012, 0.012])
    raw = np.exp(-((verts[:, None] - anchors[None]) ** 2).sum(-1) / (2 * sigma ** 2))
    weights = raw / raw.sum(1, keepdims=True)
    regressor = np.zeros((5, len(verts)))
    for j, a in enumerate(anchors):  # each joint: the mean of the 8 vertices nearest its anchor
        near = np.argsort(((verts - a) ** 2).sum(1))[:8]
        regressor[j, near] = 1 / 8
    return sp.csc_matrix(regressor), weights


def synthetic_flame(seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    unit = _sphere_points(300)
    verts = unit * RADII
    verts[:, 2] += 0.012 * np.exp(-((unit - [0, 0, 1]) ** 2).sum(1) / 0.05)  # a nose
    faces = ConvexHull(unit).simplices.astype(np.uint32)
    j_regressor, weights = _skinning(verts)
    model = {
        "v_template": verts,
        "shapedirs": _smooth_fields(verts, N_SHAPE + N_EXPR, 0.003, rng),
        "posedirs": _smooth_fields(verts, 36, 0.002, rng),
        "J_regressor": j_regressor,
        "weights": weights,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "f": faces,
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }
    centroids = verts[faces.astype(np.int64)].mean(1)
    front = np.flatnonzero((centroids[:, 2] > 0.03) & (centroids[:, 1] > -0.08))
    embedding = {
        "lmk_face_idx": rng.choice(front, N_LMK, replace=True).astype(np.int64),
        "lmk_b_coords": rng.dirichlet([3, 3, 3], N_LMK),
        "landmark_indices": rng.choice(478, N_LMK, replace=False).astype(np.int64),
    }
    return model, embedding


class _FakeChumpy:
    """Installs ``chumpy`` / ``chumpy.ch`` modules whose ``Ch`` pickles like chumpy's: its
    ``__dict__`` minus weak references, restored through NEWOBJ + BUILD."""

    def __enter__(self):
        self.saved = {k: sys.modules.get(k) for k in ("chumpy", "chumpy.ch")}
        pkg, ch = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")

        class Ch:
            def __init__(self, x):
                self.x = np.asarray(x, dtype=np.float64)
                self._dirty_vars = {"x"}
                self._itr = None
                self._depends_on_deps = {}
                self._make_dense, self._make_sparse = False, False

        class ChArrayState:
            """A chumpy-like class whose pickled state is the array itself."""

            def __init__(self, x):
                self.x = np.asarray(x)

            def __getstate__(self):
                return self.x

        for cls in (Ch, ChArrayState):
            cls.__module__ = "chumpy.ch"
            cls.__qualname__ = cls.__name__
            setattr(ch, cls.__name__, cls)
        pkg.ch = ch
        sys.modules.update({"chumpy": pkg, "chumpy.ch": ch})
        return ch

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def write_flame(directory: Path, model: dict, embedding: dict) -> tuple[Path, Path]:
    pkl, npz = directory / "generic_model.pkl", directory / "mediapipe_landmark_embedding.npz"
    with _FakeChumpy() as ch:
        data = dict(model)
        data["v_template"] = ch.Ch(model["v_template"])
        data["shapedirs"] = ch.Ch(model["shapedirs"])
        data["weights"] = ch.ChArrayState(model["weights"])
        data["J"] = ch.Ch(model["J_regressor"] @ model["v_template"])
        pkl.write_bytes(pickle.dumps(data, protocol=2))
    np.savez(npz, **embedding)
    return pkl, npz


@pytest.fixture(scope="module")
def flame_files(tmp_path_factory):
    model, embedding = synthetic_flame()
    pkl, npz = write_flame(tmp_path_factory.mktemp("flame"), model, embedding)
    return pkl, npz, model, embedding


@pytest.fixture(scope="module")
def flame(flame_files):
    pkl, npz, _, _ = flame_files
    return load_flame(pkl, npz)


# --------------------------------------------------------------------------------------------
# Loading


def test_loader_round_trips_every_array(flame_files, flame):
    pkl, npz, model, embedding = flame_files
    assert b"chumpy.ch" in pkl.read_bytes() and b"scipy.sparse" in pkl.read_bytes()
    had_chumpy = "chumpy" in sys.modules
    load_flame(pkl, npz)
    assert ("chumpy" in sys.modules) == had_chumpy  # the loader never imports chumpy
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    np.testing.assert_array_equal(flame.v_template.numpy(), f32(model["v_template"]))
    np.testing.assert_array_equal(flame.shapedirs.numpy(), f32(model["shapedirs"][:, :, :N_SHAPE]))
    np.testing.assert_array_equal(flame.exprdirs.numpy(), f32(model["shapedirs"][:, :, N_SHAPE:]))
    np.testing.assert_array_equal(flame.posedirs.numpy(), f32(model["posedirs"].reshape(-1, 36).T))
    np.testing.assert_array_equal(flame.j_regressor.numpy(), f32(model["J_regressor"].toarray()))
    np.testing.assert_array_equal(flame.weights.numpy(), f32(model["weights"]))
    np.testing.assert_array_equal(flame.faces.numpy(), model["f"].astype(np.int64))
    assert flame.parents == [-1, 0, 1, 1, 1]
    np.testing.assert_array_equal(flame.landmark_indices, embedding["landmark_indices"])
    np.testing.assert_array_equal(flame.lmk_face_idx.numpy(), embedding["lmk_face_idx"])
    assert (flame.n_shape, flame.n_expr) == (N_SHAPE, N_EXPR)


def test_loader_takes_old_scipy_paths_and_clips_component_counts(flame_files, tmp_path):
    pkl, npz, model, _ = flame_files
    raw = pkl.read_bytes()
    assert b"scipy.sparse._csc\n" in raw
    old = tmp_path / "generic_model.pkl"
    old.write_bytes(raw.replace(b"scipy.sparse._csc\n", b"scipy.sparse.csc\n"))  # scipy < 1.8 pickles
    m = load_flame(old, npz, n_shape=5, n_expr=50, shape_columns=N_SHAPE)
    assert (m.n_shape, m.n_expr) == (5, N_EXPR)
    np.testing.assert_array_equal(m.j_regressor.numpy(), np.float32(model["J_regressor"].toarray()))


class _RunsCode:
    def __init__(self, func, *args):
        self.call = (func, args)

    def __reduce__(self):
        return self.call


@pytest.mark.parametrize("payload", ["system", "eval", "popen"])
def test_a_pickle_that_runs_code_is_refused_before_it_runs(flame_files, tmp_path, payload):
    import builtins
    import subprocess

    _, npz, model, _ = flame_files
    marker = tmp_path / "pwned"
    evil = {
        "system": _RunsCode(os.system, f"touch {marker}"),
        "eval": _RunsCode(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "popen": _RunsCode(subprocess.Popen, ["touch", str(marker)]),
    }[payload]
    data = dict(model, posedirs={"nested": [evil]})
    pkl = tmp_path / "generic_model.pkl"
    pkl.write_bytes(pickle.dumps(data, protocol=2))
    with pytest.raises(InputError, match="refuses to load") as info:
        load_flame(pkl, npz)
    expected = {"system": f"{os.system.__module__}\\.system", "eval": "builtins\\.eval",
                "popen": "subprocess\\.Popen"}
    assert re.search(f"asks for {expected[payload]}", str(info.value))
    time.sleep(0.05)
    assert not marker.exists()


def test_missing_files_name_the_file_and_where_it_goes(flame_files, tmp_path):
    _, npz, _, _ = flame_files
    with pytest.raises(MissingModel, match="generic_model.pkl") as info:
        load_flame(tmp_path / "generic_model.pkl", npz)
    assert "TALKCLI_FLAME" in str(info.value)
    pkl = flame_files[0]
    with pytest.raises(MissingModel, match="mediapipe_landmark_embedding.npz"):
        load_flame(pkl, tmp_path / "mediapipe_landmark_embedding.npz")


def test_wrong_keys_and_shapes_name_the_key(flame_files, tmp_path):
    _, npz, model, _ = flame_files
    pkl = tmp_path / "generic_model.pkl"
    pkl.write_bytes(pickle.dumps({k: v for k, v in model.items() if k != "posedirs"}, protocol=2))
    with pytest.raises(InputError, match="'posedirs'"):
        load_flame(pkl, npz)
    pkl.write_bytes(pickle.dumps(dict(model, weights=model["weights"][:, :4]), protocol=2))
    with pytest.raises(InputError, match="'weights'"):
        load_flame(pkl, npz)
    pkl.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(InputError, match="not a FLAME model"):
        load_flame(pkl, npz)
    pkl.write_bytes(b"\x80\x02}q\x00(X")  # truncated
    with pytest.raises(InputError, match="cannot read"):
        load_flame(pkl, npz)


# --------------------------------------------------------------------------------------------
# The model


def test_rodrigues_matches_scipy_and_has_a_gradient_at_zero():
    rv = torch.tensor(np.random.default_rng(1).normal(size=(20, 3)) * 0.8, dtype=torch.float32)
    np.testing.assert_allclose(rodrigues(rv).numpy(), Rotation.from_rotvec(rv.numpy()).as_matrix(), atol=1e-6)
    zero = torch.zeros(1, 3, requires_grad=True)
    rodrigues(zero)[0, 1, 0].backward()  # d R[1,0] / d rz = 1 at the identity
    np.testing.assert_allclose(zero.grad.numpy(), [[0, 0, 1]], atol=1e-6)


def _zeros(b: int, flame):
    return dict(shape=torch.zeros(b, flame.n_shape), expr=torch.zeros(b, flame.n_expr),
                global_pose=torch.zeros(b, 3), neck_pose=torch.zeros(b, 3), jaw_pose=torch.zeros(b, 3))


def test_zero_parameters_give_the_template(flame):
    v = flame.forward(**_zeros(2, flame))
    np.testing.assert_allclose(v.numpy(), flame.v_template.expand(2, -1, -1).numpy(), atol=1e-7)


def test_global_rotation_rotates_rigidly_about_the_root(flame):
    p = _zeros(1, flame)
    p["global_pose"] = torch.tensor([[0.3, -0.5, 0.2]])
    v = flame.forward(**p)[0].numpy()
    r = Rotation.from_rotvec([0.3, -0.5, 0.2]).as_matrix()
    root = flame.joints_template[0].numpy()
    np.testing.assert_allclose(v, (flame.v_template.numpy() - root) @ r.T + root, atol=1e-6)


def test_expression_moves_vertices_by_its_blendshapes_only(flame):
    p = _zeros(1, flame)
    p["expr"] = torch.tensor(np.random.default_rng(2).normal(size=(1, flame.n_expr)), dtype=torch.float32)
    moved = flame.forward(**p)[0] - flame.v_template
    np.testing.assert_allclose(moved.numpy(), (flame.exprdirs @ p["expr"][0]).numpy(), atol=1e-6)


def test_posed_landmarks_equal_the_embedding_of_the_full_mesh(flame):
    rng = np.random.default_rng(3)
    t = lambda *s: torch.tensor(rng.normal(size=s) * 0.3, dtype=torch.float32)  # noqa: E731
    args = (t(4, flame.n_shape), t(4, flame.n_expr), t(4, 3), t(4, 3), t(4, 3), t(4, 6))
    full = flame.landmarks(flame.forward(*args))
    np.testing.assert_allclose(flame.posed_landmarks(*args).numpy(), full.numpy(), atol=1e-6)
    # the shaped joints are J_regressor applied to the shaped mesh
    zero_pose = torch.zeros(4, 3)
    shaped = flame.forward(args[0], args[1], zero_pose, zero_pose, zero_pose)
    np.testing.assert_allclose(flame.joints(args[0], args[1]).numpy(),
                               (flame.j_regressor @ shaped).numpy(), atol=1e-6)


# --------------------------------------------------------------------------------------------
# The fit


def _ground_truth(flame, n: int, rng) -> dict:
    """A smooth head motion: yaw up to 20 degrees, pitch/roll smaller, small neck, jaw opening."""
    t = np.linspace(0, 1, n)
    wave = lambda amp, freq, phase: amp * np.sin(2 * np.pi * freq * t + phase)  # noqa: E731
    deg = np.radians
    global_pose = np.stack([wave(deg(10), 0.7, 0.3), wave(deg(20), 1.0, 0.0), wave(deg(5), 0.5, 1.0)], 1)
    neck = np.stack([wave(deg(1), 0.6, 0.5), wave(deg(1), 0.8, 0.2), np.zeros(n)], 1)
    jaw = np.stack([0.1 + wave(0.1, 1.3, 0.0), np.zeros(n), np.zeros(n)], 1)
    expr = np.stack([wave(rng.uniform(0.5, 1.5), rng.uniform(0.5, 2), rng.uniform(0, 6))
                     for _ in range(flame.n_expr)], 1)
    trans = np.stack([wave(0.03, 0.4, 0.0), wave(0.02, 0.3, 1.0), 0.6 + wave(0.05, 0.5, 2.0)], 1)
    return {"shape": rng.normal(size=flame.n_shape) * 0.5, "expr": expr, "global": global_pose, "neck": neck,
            "jaw": jaw, "trans": trans}


def _render(flame, gt: dict, focal: float, size: int):
    """Camera-space landmarks and their pixels: the FLAME mesh posed by the global rotation about
    FLAME's origin, turned into the camera frame (y down, z forward) and translated."""
    f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    n = len(gt["expr"])
    with torch.no_grad():
        local = flame.posed_landmarks(f32(gt["shape"]), f32(gt["expr"]), torch.zeros(n, 3), f32(gt["neck"]),
                                      f32(gt["jaw"])).numpy().astype(np.float64)
    head = local @ FLAME_TO_HEAD
    rot = FLAME_TO_HEAD @ Rotation.from_rotvec(gt["global"]).as_matrix() @ FLAME_TO_HEAD  # head -> camera
    pix = project(head, rot, gt["trans"], focal, size / 2, size / 2)
    cam = np.einsum("nij,nkj->nki", rot, head) + gt["trans"][:, None]
    return head, rot, cam, pix


def _angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.degrees(Rotation.from_matrix(a @ np.transpose(b, (0, 2, 1))).magnitude())


def test_fit_recovers_known_parameters(flame):
    rng = np.random.default_rng(4)
    n, size, focal = 40, 512, 1000.0
    gt = _ground_truth(flame, n, rng)
    head, rot, _, pix = _render(flame, gt, focal, size)
    lms = np.zeros((n, 478, 2))
    lms[:, flame.landmark_indices] = pix + rng.normal(scale=0.3, size=pix.shape)
    ok = np.ones(n, dtype=bool)

    fit = fit_flame(lms, ok, size, flame)

    idx = flame.landmark_indices
    err = np.linalg.norm(fit.projected[:, idx] - lms[:, idx], axis=-1)
    assert np.median(err) < 1.0, np.median(err)
    assert np.isnan(fit.projected[:, np.setdiff1d(np.arange(478), idx)]).all()
    assert abs(fit.focal / focal - 1) < 0.10, fit.focal
    # the head's rotation; the neck (GT within 1.5 degrees) moves the face like the global pose
    # does, so the fit keeps it near zero and the global pose takes it
    assert np.percentile(_angle_deg(fit.rotation, rot), 90) < 2.0
    def with_neck(r, neck):
        return r @ (FLAME_TO_HEAD @ Rotation.from_rotvec(neck).as_matrix() @ FLAME_TO_HEAD)

    head_rot_err = _angle_deg(with_neck(fit.rotation, fit.extra["neck_pose"].astype(np.float64)),
                              with_neck(rot, gt["neck"]))
    assert np.percentile(head_rot_err, 90) < 1.5
    # focal and depth trade off (a longer lens and a farther head look alike): compare the
    # translation at the true focal
    assert np.abs(fit.translation * (focal / fit.focal) - gt["trans"]).max() < 0.02
    # shape + expression + jaw: the posed landmarks in the head frame, and their motion
    assert np.median(np.linalg.norm(fit.landmarks3d[:, idx] - head, axis=-1)) < 0.003
    motion_fit = fit.landmarks3d[:, idx] - fit.landmarks3d[:1, idx]
    assert np.median(np.linalg.norm(motion_fit - (head - head[:1]), axis=-1)) < 0.002
    assert fit.expression.shape == (n, flame.n_expr) and fit.shape.shape == (flame.n_shape,)
    assert {"jaw_pose", "neck_pose", "global_pose", "vertices_template_shaped"} <= set(fit.extra)
    assert fit.extra["vertices_template_shaped"].shape == (flame.n_verts, 3)


def test_fit_global_pose_reproduces_the_camera_points_through_flame(flame):
    """extra's FLAME global pose and translation place FLAME's own forward() output where the
    FaceFit rotation/translation put the head: C (v_flame + transl) = R head + t."""
    rng = np.random.default_rng(5)
    n, size = 12, 512
    gt = _ground_truth(flame, n, rng)
    _, _, _, pix = _render(flame, gt, 1000.0, size)
    lms = np.zeros((n, 478, 3))
    lms[:, flame.landmark_indices, :2] = pix
    ok = np.ones(n, dtype=bool)
    ok[[0, 5, 6]] = False  # an edge frame and a gap: filled, and still not ok
    lms[5] = np.nan
    fit = fit_flame(lms, ok, size, flame, focal=1000.0)
    assert fit.focal == 1000.0
    np.testing.assert_array_equal(fit.ok, ok)
    assert np.isfinite(fit.rotation).all() and np.isfinite(fit.translation).all()
    f32 = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    e = fit.extra
    with torch.no_grad():
        v = flame.forward(f32(fit.shape), f32(fit.expression), f32(e["global_pose"]), f32(e["neck_pose"]),
                          f32(e["jaw_pose"]))
        lm = flame.landmarks(v).numpy()
    via_flame = (lm + e["flame_transl"][:, None]) @ FLAME_TO_HEAD
    idx = flame.landmark_indices
    via_fit = np.einsum("nij,nkj->nki", fit.rotation, fit.landmarks3d[:, idx]) + fit.translation[:, None]
    np.testing.assert_allclose(via_flame, via_fit, atol=2e-5)
    # the gap (frames 5, 6) is slerped from frames 4 and 7; the edge frame copies frame 1
    step = _angle_deg(fit.rotation[4:5], fit.rotation[5:6])[0]
    assert abs(step - _angle_deg(fit.rotation[4:5], fit.rotation[7:8])[0] / 3) < 0.05
    assert _angle_deg(fit.rotation[0:1], fit.rotation[1:2])[0] < 0.05
    np.testing.assert_allclose(fit.expression[5], (2 * fit.expression[4] + fit.expression[7]) / 3, atol=1e-5)


def test_a_neutral_face_looking_at_the_camera_has_the_identity_rotation(flame):
    n, size = 5, 512
    gt = {"shape": np.zeros(flame.n_shape), "expr": np.zeros((n, flame.n_expr)), "global": np.zeros((n, 3)),
          "neck": np.zeros((n, 3)), "jaw": np.zeros((n, 3)), "trans": np.tile([0.0, 0.0, 0.6], (n, 1))}
    head, rot, _, pix = _render(flame, gt, 1000.0, size)
    np.testing.assert_allclose(rot, np.tile(np.eye(3), (n, 1, 1)))
    # FaceFit's head frame: the face looks along -z (at the camera), y points down the image
    assert np.median(head[0, :, 2]) < 0
    above = head[0, :, 1] < 0
    assert above.any() and (pix[0, above, 1] < size / 2).all() and (pix[0, ~above, 1] > size / 2).all()
    lms = np.zeros((n, 478, 2))
    lms[:, flame.landmark_indices] = pix
    fit = fit_flame(lms, np.ones(n, dtype=bool), size, flame, focal=1000.0)
    assert _angle_deg(fit.rotation, rot).max() < 0.5
    np.testing.assert_allclose(fit.translation, gt["trans"], atol=2e-3)


def test_fit_without_any_tracked_frame_is_an_input_error(flame):
    with pytest.raises(InputError, match="no frame"):
        fit_flame(np.zeros((3, 478, 2)), np.zeros(3, dtype=bool), 512, flame)

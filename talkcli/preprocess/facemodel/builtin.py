"""The built-in face model: a person-specific linear blendshape model fitted from the subject's frames.

1. Rigid alignment: every tracked frame's 478 landmarks are aligned to a reference by a similarity
   Procrustes on the STABLE points (skull-bound), iteratively reweighted so that a badly tracked
   point cannot pull the pose. The reference becomes the mean aligned shape; two rounds.
2. Neutral and expressions: the neutral is the mean aligned shape, turned frontal (eye line along
   x, forehead-to-chin along y) and scaled to metres by the inter-iris distance (63 mm, the adult
   mean). The expression basis is the PCA of the aligned residuals: the fewest components that
   explain ``explained`` of the non-rigid variance, at most ``max_components``.
3. Camera: per-frame pose by PnP of the expression-aware model landmarks against the 2D landmarks;
   one focal length for the sequence, chosen by the lowest median reprojection error over a
   log-spaced search on a subset of frames.
4. Smoothing: rotation (as rotation vectors) and translation are low-pass filtered over time with
   a small Gaussian, the expression coefficients with a smaller one: tracker noise, not motion, is
   what makes heads shake in today's tools.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import FaceFit, project
from .mesh import IRIS_CENTRES, N_MESH, STABLE

IRIS_DISTANCE_M = 0.063
HEAD_DEPTH_M = 0.09  # origin this far behind the mean face surface: near the centre of the head


@dataclasses.dataclass(frozen=True)
class BuiltinFitConfig:
    max_components: int = 32
    explained: float = 0.97
    pose_sigma: float = 1.0  # frames
    expression_sigma: float = 0.5  # frames
    # focal / image width. MediaPipe depth is near-orthographic, so the error falls towards long
    # focals; the range stops at plausible lenses for a head-and-shoulders crop.
    focal_search: tuple[float, float] = (1.0, 6.0)


def umeyama(src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Weighted similarity (s, R, t) minimising sum w |s R src + t - dst|^2."""
    w = w / w.sum()
    mu_s, mu_d = w @ src, w @ dst
    xs, xd = src - mu_s, dst - mu_d
    cov = (xd * w[:, None]).T @ xs
    u, sig, vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(u @ vt))
    e = np.diag([1.0, 1.0, d])
    r = u @ e @ vt
    var = (w * (xs ** 2).sum(axis=1)).sum()
    s = float((sig * np.diag(e)).sum() / max(var, 1e-12))
    return s, r, mu_d - s * r @ mu_s


def robust_align(points: np.ndarray, ref: np.ndarray, idx: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Align one frame to ``ref`` on points ``idx`` with Huber reweighting; returns all points aligned."""
    w = np.ones(len(idx))
    for _ in range(rounds):
        s, r, t = umeyama(points[idx], ref[idx], w)
        res = np.linalg.norm(s * points[idx] @ r.T + t - ref[idx], axis=1)
        k = 1.345 * max(np.median(res), 1e-6) * 1.4826
        w = np.where(res <= k, 1.0, k / np.maximum(res, 1e-12))
    return s * points @ r.T + t


def frontal_frame(shape: np.ndarray) -> np.ndarray:
    """Rotation that puts the eye line on x and the forehead-chin line on y (z away from camera)."""
    x = shape[263] - shape[33]  # subject's left outer eye corner minus right: image right
    x /= np.linalg.norm(x)
    y = shape[152] - shape[10]  # chin minus forehead: down
    y -= x * (x @ y)
    y /= np.linalg.norm(y)
    return np.stack([x, y, np.cross(x, y)])  # rows: new axes in old coordinates


def gaussian_smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0 or len(x) < 3:
        return x
    from scipy.ndimage import gaussian_filter1d

    return gaussian_filter1d(x, sigma, axis=0, mode="nearest")


def _rotvec(r: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(r).as_rotvec()


def _matrix(v: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_rotvec(v).as_matrix()


def _pnp(model: np.ndarray, image: np.ndarray, focal: float, cx: float, cy: float,
         guess: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    k = np.array([[focal, 0, cx], [0, focal, cy], [0, 0, 1]], np.float64)
    if guess is None:
        ok, rv, tv = cv2.solvePnP(model.astype(np.float64), image.astype(np.float64), k, None,
                                  flags=cv2.SOLVEPNP_SQPNP)
    else:
        rv, tv = guess[0].copy().reshape(3, 1), guess[1].copy().reshape(3, 1)
        ok, rv, tv = cv2.solvePnP(model.astype(np.float64), image.astype(np.float64), k, None, rv, tv,
                                  useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
    return rv.reshape(3), tv.reshape(3)


def _refine_expression(c: np.ndarray, neutral: np.ndarray, basis: np.ndarray, r: np.ndarray, t: np.ndarray,
                       target: np.ndarray, focal: float, cx: float, cy: float, damping: float = 1e-3) -> np.ndarray:
    """One damped Gauss-Newton step on the expression coefficients for a fixed pose."""
    x = neutral + np.tensordot(c, basis, axes=1)
    y = x @ r.T + t  # (P, 3) camera points
    z = np.maximum(y[:, 2], 1e-6)
    res = np.concatenate([focal * y[:, 0] / z + cx - target[:, 0], focal * y[:, 1] / z + cy - target[:, 1]])
    dy = np.einsum("ij,kpj->kpi", r, basis)  # (K, P, 3) camera-space derivative per coefficient
    ju = focal * (dy[..., 0] / z - y[:, 0] * dy[..., 2] / z ** 2)  # (K, P)
    jv = focal * (dy[..., 1] / z - y[:, 1] * dy[..., 2] / z ** 2)
    jac = np.concatenate([ju, jv], axis=1).T  # (2P, K)
    jtj = jac.T @ jac
    lam = damping * np.trace(jtj) / len(c)
    return c - np.linalg.solve(jtj + lam * np.eye(len(c)), jac.T @ res)


def fit_builtin(points: np.ndarray, ok: np.ndarray, image_size: tuple[int, int],
                cfg: BuiltinFitConfig = BuiltinFitConfig(), progress=None) -> FaceFit:
    """Fit the person-specific model to ``points`` (N, 478, 3) in pixels; see the module docstring."""
    n = len(points)
    idx = np.flatnonzero(ok)
    if len(idx) < 3:
        raise ValueError("fewer than 3 tracked frames")
    w, h = image_size
    cx, cy = w / 2.0, h / 2.0
    p = points[idx].astype(np.float64)

    # 1. rigid alignment, two rounds against the evolving mean shape
    ref = p[len(p) // 2]
    for _ in range(2):
        aligned = np.stack([robust_align(f, ref, STABLE) for f in p])
        ref = aligned.mean(axis=0)

    # 2. neutral in metres, frontal; expression basis by PCA
    rot = frontal_frame(ref)
    scale = IRIS_DISTANCE_M / np.linalg.norm(ref[IRIS_CENTRES[0]] - ref[IRIS_CENTRES[1]])
    centre = ref[:N_MESH].mean(axis=0)
    metric = (aligned - centre) @ rot.T * scale
    metric[..., 2] += HEAD_DEPTH_M
    neutral = metric.mean(axis=0)
    resid = (metric - neutral).reshape(len(idx), -1)
    _, sing, vt = np.linalg.svd(resid, full_matrices=False)
    var = sing ** 2
    ratio = np.cumsum(var) / max(var.sum(), 1e-18)
    k = int(min(cfg.max_components, len(idx) - 1, np.searchsorted(ratio, cfg.explained) + 1))
    basis = vt[:k].reshape(k, -1, 3)
    coeffs = resid @ vt[:k].T  # (M, k) metres-scaled coefficients

    # 3. camera: focal search on a subset, then PnP for every frame
    def model_points(c: np.ndarray) -> np.ndarray:
        return neutral + np.tensordot(c, basis, axes=1)

    subset = np.linspace(0, len(idx) - 1, min(len(idx), 16)).astype(int)

    def solve(j: int, focal: float, guess=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Pose and expression of frame j against its 2D landmarks: PnP, then Gauss-Newton on
        the coefficients (they absorb what the orthographic-looking mediapipe depth got wrong)."""
        c = coeffs[j].copy()
        for _ in range(2):
            rv, tv = guess = _pnp(model_points(c), p[j, :, :2], focal, cx, cy, guess)
            c = _refine_expression(c, neutral, basis, _matrix(rv), tv, p[j, :, :2], focal, cx, cy)
        rv, tv = _pnp(model_points(c), p[j, :, :2], focal, cx, cy, guess)
        proj = project(model_points(c)[None], _matrix(rv)[None], tv[None], focal, cx, cy)[0]
        return rv, tv, c, np.linalg.norm(proj - p[j, :, :2], axis=1)

    def median_error(focal: float) -> float:
        return float(np.median(np.concatenate([solve(j, focal)[3] for j in subset])))

    lo, hi = np.log(cfg.focal_search[0] * w), np.log(cfg.focal_search[1] * w)
    grid = np.linspace(lo, hi, 8)
    errs = [median_error(np.exp(g)) for g in grid]
    best = int(np.argmin(errs))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    # golden-section refinement around the best grid point, one new evaluation per step
    g = (np.sqrt(5) - 1) / 2
    m1, m2 = b - g * (b - a), a + g * (b - a)
    e1, e2 = median_error(np.exp(m1)), median_error(np.exp(m2))
    for _ in range(8):
        if e1 < e2:
            b, m2, e2 = m2, m1, e1
            m1 = b - g * (b - a)
            e1 = median_error(np.exp(m1))
        else:
            a, m1, e1 = m1, m2, e2
            m2 = a + g * (b - a)
            e2 = median_error(np.exp(m2))
    focal = float(np.exp((a + b) / 2))

    rvecs = np.zeros((len(idx), 3))
    tvecs = np.zeros((len(idx), 3))
    guess = None
    for j in range(len(idx)):
        rvecs[j], tvecs[j], coeffs[j], _ = solve(j, focal, guess)
        guess = (rvecs[j], tvecs[j])
        if progress is not None:
            progress.advance()

    # 4. temporal smoothing (on the tracked frames, in order), then fill untracked frames
    rvecs_s = gaussian_smooth(rvecs, cfg.pose_sigma)
    tvecs_s = gaussian_smooth(tvecs, cfg.pose_sigma)
    coeffs_s = gaussian_smooth(coeffs, cfg.expression_sigma)

    def fill(values: np.ndarray) -> np.ndarray:
        """Untracked frames get values interpolated from their tracked neighbours."""
        flat = values.reshape(len(idx), -1)
        out = np.stack([np.interp(np.arange(n), idx, flat[:, c]) for c in range(flat.shape[1])], axis=1)
        return out.reshape((n,) + values.shape[1:])

    rv_all, tv_all, c_all = fill(rvecs_s), fill(tvecs_s), fill(coeffs_s)
    rotation = _matrix(rv_all)
    lm3d = neutral + np.tensordot(c_all, basis, axes=1)
    projected = project(lm3d, rotation, tv_all, focal, cx, cy)
    return FaceFit(
        model="builtin",
        rotation=rotation.astype(np.float32),
        translation=tv_all.astype(np.float32),
        expression=c_all.astype(np.float32),
        shape=np.zeros(0, np.float32),
        focal=focal,
        cx=cx,
        cy=cy,
        landmarks3d=lm3d.astype(np.float32),
        projected=projected.astype(np.float32),
        ok=ok.copy(),
        extra={
            "neutral": neutral.astype(np.float32),
            "basis": basis.astype(np.float32),
            "explained_variance_ratio": (var[:k] / max(var.sum(), 1e-18)).astype(np.float32),
            "components_for_95": np.int64(np.searchsorted(ratio, 0.95) + 1),
            "rotation_raw": _matrix(fill(rvecs)).astype(np.float32),
            "translation_raw": fill(tvecs).astype(np.float32),
        },
    )

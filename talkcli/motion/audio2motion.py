"""Audio -> 68 3D landmarks, learned from the subject's own video (or from many workspaces).

R2-Talker drives its avatar with landmarks from GeneFace's pretrained audio-to-motion generator,
whose weights are not available here. This one is learned where the data is, and a few minutes of
one person is little data, so the model is small and chosen by cross-validation:

    log-mel (4 windows per video frame, 80 bins) pooled into B bands, frames t-c..t+c,
      standardised --regressor--> landmark offsets (68 x 3, face-scale units)
      --Gaussian smoothing over time--> x face scale + neutral = landmarks in the head frame

Two regressors compete: k-nearest-neighbour regression (the mean offsets of the k training frames
whose audio windows are closest: it keeps the subject's real mouth shapes) and ridge regression
onto the K leading components of a PCA of the offsets. Offsets are divided by the face width so
that several subjects share one space in ``train-motion``. The regressor, B, c, k or (K, ridge
strength) and the smoothing are picked by 5-fold cross-validation over contiguous blocks of the
training frames (never the held-out ones), scored by the mouth landmarks' error relative to the
mean expression's minus the correlation of the mouth opening (``_sync_score``).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np

MOUTH = slice(48, 68)


@dataclass(frozen=True)
class MotionConfig:
    bands: tuple[int, ...] = (1, 4, 16)          # mel bands after pooling the 80 bins
    contexts: tuple[int, ...] = (2, 4, 8)        # frames on each side
    components: tuple[int, ...] = (2, 4, 8)      # K
    ridge: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0, 10000.0)
    smoothing: tuple[float, ...] = (0.5, 1.0, 2.0)  # Gaussian sigma in frames
    # k <= 10: averaging more neighbours pulls every mouth towards the mean shape (a mouth that
    # barely moves scores well on landmark error and looks dead; see _sync_score)
    neighbours: tuple[int, ...] = (1, 3, 5, 10)
    kinds: tuple[str, ...] = ("knn",)            # "ridge" too: on a few minutes of one person it
    folds: int = 5                               # collapses to the mean expression (docs/results.md)


def face_scale(landmarks: np.ndarray) -> float:
    """The face width (jaw corner to jaw corner, iBUG 0 and 16), median over frames, metres."""
    return float(np.median(np.linalg.norm(landmarks[:, 0] - landmarks[:, 16], axis=-1)))


def audio_windows(features: np.ndarray, bands: int = 80, context: int = 8) -> np.ndarray:
    """(T, 4, 80) per-frame log-mel -> (T, (2c+1)*4*bands): bins pooled into ``bands``, frames
    t-c..t+c (edges repeated)."""
    t, k, m = features.shape
    pooled = features.reshape(t, k, bands, m // bands).mean(-1).reshape(t, -1)
    idx = np.clip(np.arange(t)[:, None] + np.arange(-context, context + 1)[None, :], 0, t - 1)
    return pooled[idx].reshape(t, -1)


def gaussian_smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """Smooth (T, ...) along time with edge padding."""
    if sigma <= 0 or len(x) < 2:
        return x
    from scipy.ndimage import gaussian_filter1d

    return gaussian_filter1d(x, sigma, axis=0, mode="nearest")


@dataclass
class MotionModel:
    """A fitted audio -> landmark-offset generator (``kind`` "knn" or "ridge")."""

    kind: str
    neighbours: int
    bands: int
    context: int
    smoothing: float
    ridge: float
    feat_mean: np.ndarray     # standardisation of the windowed features
    feat_std: np.ndarray
    weights: np.ndarray       # ridge: (D + 1, K) weights (last row: bias); knn: (N, D) training windows
    basis: np.ndarray         # ridge: (K, 68*3) motion basis; knn: (N, 68*3) training offsets
    offset_mean: np.ndarray   # (68*3,)
    subjects: list[str]
    cv_score: float           # the selected setting's cross-validated _sync_score

    def predict_offsets(self, features: np.ndarray) -> np.ndarray:
        """(T, 4, 80) log-mel -> (T, 68, 3) landmark offsets in face-scale units (smoothed)."""
        x = (audio_windows(features, self.bands, self.context) - self.feat_mean) / self.feat_std
        if self.kind == "knn":
            out = _knn(self.weights, self.basis, x, self.neighbours)
        else:
            out = self.offset_mean + (x @ self.weights[:-1] + self.weights[-1]) @ self.basis
        return gaussian_smooth(out, self.smoothing).reshape(-1, 68, 3).astype(np.float32)

    def to_dict(self) -> dict:
        return {"format": 2, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "MotionModel":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class MotionData:
    """One subject's frames for motion training: features (T, 4, 80), landmark offsets from the
    subject's mean in face-scale units (T, 68, 3), and which frames to learn from."""

    name: str
    features: np.ndarray
    offsets: np.ndarray
    use: np.ndarray


def _ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    xb = np.concatenate([x, np.ones((len(x), 1), x.dtype)], axis=1)
    reg = lam * np.eye(xb.shape[1])
    reg[-1, -1] = 0.0  # no penalty on the bias
    return np.linalg.solve(xb.T @ xb + reg, xb.T @ y)


def _knn(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Mean of the targets of the k nearest training rows, queries in chunks (bounded memory)."""
    k = min(k, len(train_x))
    sq = (train_x ** 2).sum(1)
    out = np.empty((len(x), train_y.shape[1]), np.float64)
    for s in range(0, len(x), chunk):
        q = x[s:s + chunk]
        d = sq[None, :] - 2 * q @ train_x.T
        nn = np.argpartition(d, k - 1, axis=1)[:, :k]
        out[s:s + chunk] = train_y[nn].mean(1)
    return out


def _mouth_err(pred_offsets: np.ndarray, true_offsets: np.ndarray) -> float:
    p = pred_offsets.reshape(len(pred_offsets), 68, 3)[:, MOUTH]
    t = true_offsets.reshape(len(true_offsets), 68, 3)[:, MOUTH]
    return float(np.linalg.norm(p - t, axis=-1).mean())


def _sync_score(pred_offsets: np.ndarray, true_offsets: np.ndarray, mean_err: float) -> float:
    """What cross-validation minimises: mouth landmark error relative to the mean expression's,
    minus the correlation of the mouth opening with the truth. Landmark error alone rewards a
    mouth that does not move (the mean); lip sync is the opening following the speech."""
    p = pred_offsets.reshape(len(pred_offsets), 68, 3)
    t = true_offsets.reshape(len(true_offsets), 68, 3)
    a, b = mouth_opening(p), mouth_opening(t)
    corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 1e-9 and b.std() > 1e-9 else 0.0
    return _mouth_err(pred_offsets, true_offsets) / max(mean_err, 1e-9) - corr


def _cv_score(x: np.ndarray, ys: np.ndarray, fold: np.ndarray, folds: int, smoothing: float, predict) -> float:
    """Mean ``_sync_score`` over the folds of ``predict(x_train, y_train, x_test) -> offsets``, with
    the features standardised on each fold's training part and the prediction smoothed in time."""
    err = []
    for f in range(folds):
        tr, te = fold != f, fold == f
        if te.sum() == 0 or tr.sum() < 2:
            continue
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-3
        pred = gaussian_smooth(predict((x[tr] - mu) / sd, ys[tr], (x[te] - mu) / sd), smoothing)
        base = _mouth_err(np.broadcast_to(ys[tr].mean(0), ys[te].shape), ys[te])
        err.append(_sync_score(pred, ys[te], base))
    return float(np.mean(err))


def fit(datasets: list[MotionData], cfg: MotionConfig = MotionConfig(), progress_bar=None) -> MotionModel:
    """Select the setting by cross-validation on the ``use`` frames, then fit on all of them."""
    ys = np.concatenate([d.offsets[d.use].reshape(len(d.use), -1) for d in datasets]).astype(np.float64)
    offset_mean = ys.mean(0)
    _, _, vt = np.linalg.svd(ys - offset_mean, full_matrices=False)
    # contiguous blocks per subject as folds: neighbouring frames are too alike to test each other
    fold = np.concatenate([np.arange(len(d.use)) * cfg.folds // max(1, len(d.use)) for d in datasets])
    best = None
    settings = list(itertools.product(cfg.bands, cfg.contexts))
    for bands, context in settings:
        x = np.concatenate([audio_windows(d.features, bands, context)[d.use] for d in datasets]).astype(np.float64)
        for k in cfg.components if "ridge" in cfg.kinds else ():
            basis = vt[: min(k, vt.shape[0])]
            for lam in cfg.ridge:

                def ridge(xtr, ytr, xte, basis=basis, lam=lam):
                    w = _ridge(xtr, (ytr - offset_mean) @ basis.T, lam)
                    return offset_mean + (xte @ w[:-1] + w[-1]) @ basis

                for sm in cfg.smoothing:
                    score = _cv_score(x, ys, fold, cfg.folds, sm, ridge)
                    if best is None or score < best[0]:
                        best = (score, bands, context, k, lam, sm)
        for nb in cfg.neighbours if "knn" in cfg.kinds else ():
            for sm in cfg.smoothing:
                score = _cv_score(x, ys, fold, cfg.folds, sm, lambda xtr, ytr, xte, nb=nb: _knn(xtr, ytr, xte, nb))
                if best is None or score < best[0]:
                    best = (score, bands, context, -nb, 0.0, sm)
        if progress_bar is not None:
            progress_bar.advance()
    score, bands, context, k, lam, sm = best
    x = np.concatenate([audio_windows(d.features, bands, context)[d.use] for d in datasets]).astype(np.float64)
    mu, sd = x.mean(0), x.std(0) + 1e-3
    if k < 0:  # k-nearest neighbours
        xn = ((x - mu) / sd).astype(np.float32)
        return MotionModel("knn", -k, bands, context, sm, 0.0, mu.astype(np.float32), sd.astype(np.float32), xn,
                           ys.astype(np.float32), offset_mean.astype(np.float32), [d.name for d in datasets], score)
    basis = vt[: min(k, vt.shape[0])]
    w = _ridge((x - mu) / sd, (ys - offset_mean) @ basis.T, lam)
    return MotionModel("ridge", 0, bands, context, sm, lam, mu.astype(np.float32), sd.astype(np.float32), w.astype(np.float32),
                       basis.astype(np.float32), offset_mean.astype(np.float32), [d.name for d in datasets], score)


def mouth_error(pred: np.ndarray, true: np.ndarray, scale: float) -> float:
    """Mean distance of the mouth landmarks (48-67), in millimetres (``scale``: metres per unit)."""
    return float(np.linalg.norm((pred[:, MOUTH] - true[:, MOUTH]) * scale, axis=-1).mean() * 1000)


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """Inner-lip opening (iBUG 62 to 66 distance) per frame."""
    return np.linalg.norm(landmarks[:, 62] - landmarks[:, 66], axis=-1)

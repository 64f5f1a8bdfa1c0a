"""Audio -> 68 3D landmarks, learned from the subject's own video (or from many workspaces).

R2-Talker drives its avatar with landmarks from GeneFace's pretrained audio-to-motion generator,
whose weights are not available here. This one is learned where the data is, and a few minutes of
one person is little data, so the model is small and chosen by cross-validation:

    audio features (T, 4, C) -- pooled into B bands, frames t+lag-c..t+lag+c, standardised
      --regressor--> landmark offsets (68 x 3, face-scale units)
      --Gaussian smoothing over time--> x face scale + neutral = landmarks in the head frame

Two feature sources compete: log-mel (80 bins) and viseme classes from a phone recogniser
(``phonetic.py``; English, when pocketsphinx is installed). Two regressors compete: k-nearest-
neighbour regression (the mean offsets of the k training frames whose windows are closest) and
ridge regression onto the K leading components of a PCA of the offsets (K = 0: all of them).
``lag`` shifts the window later in the audio: lips move before the sound they make (and clips
carry small audio/video offsets), 120 ms or more on the fixture. Offsets are divided by the face
width so that several subjects share one space in ``train-motion``. The source, regressor, B, c,
lag, k or (K, ridge strength) and the smoothing are picked by 5-fold cross-validation over
contiguous blocks of the training frames (never the held-out ones), scored by the mouth
landmarks' error relative to the mean expression's minus the correlation of the mouth opening
(``_sync_score``). The tracked landmarks are the face model's fit, so every prediction (a
k-NN mean or a ridge combination of training offsets) stays in its expression space.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np

MOUTH = slice(48, 68)


@dataclass(frozen=True)
class MotionConfig:
    sources: tuple[str, ...] = ("mel", "visemes")  # "visemes" is skipped when pocketsphinx is missing
    bands: tuple[int, ...] = (1, 4, 16)          # mel bands after pooling the 80 bins (visemes: not pooled)
    contexts: tuple[int, ...] = (0, 1, 2, 4, 8)  # frames on each side
    lags: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)  # frames the window sits later in the audio
    components: tuple[int, ...] = (0,)           # K (0: every offset dimension)
    ridge: tuple[float, ...] = (10.0, 100.0, 1000.0, 10000.0)
    smoothing: tuple[float, ...] = (0.5, 1.0, 2.0)  # Gaussian sigma in frames
    # k <= 10: averaging more neighbours pulls every mouth towards the mean shape (a mouth that
    # barely moves scores well on landmark error and looks dead; see _sync_score)
    neighbours: tuple[int, ...] = (1, 3, 5, 10)
    kinds: tuple[str, ...] = ("knn", "ridge")
    folds: int = 5
    # amplitude gains about the mean offset, chosen on the chosen model's out-of-fold predictions:
    # a regressor predicts the expected mouth, which moves less than the real one
    gains: tuple[float, ...] = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5)
    # selection sees at most this many frames (every k-th of a long video: neighbouring frames
    # are alike, and k-NN's cost grows with the square of the frames); the fit uses all of them
    cv_max_frames: int = 1500

    def windows(self, sources: tuple[str, ...]) -> list[tuple[str, int, int, int]]:
        """Every (source, bands, context, lag) to try."""
        out = []
        for src in sources:
            for bands in (self.bands if src == "mel" else (0,)):
                out += [(src, bands, c, lag) for c, lag in itertools.product(self.contexts, self.lags)]
        return out


def face_scale(landmarks: np.ndarray) -> float:
    """The face width (jaw corner to jaw corner, iBUG 0 and 16), median over frames, metres."""
    return float(np.median(np.linalg.norm(landmarks[:, 0] - landmarks[:, 16], axis=-1)))


def audio_windows(features: np.ndarray, bands: int = 0, context: int = 8, lag: int = 0) -> np.ndarray:
    """(T, 4, C) per-frame features -> (T, (2c+1)*4*bands): the C channels pooled into ``bands``
    (0: kept), frames t+lag-c..t+lag+c (edges repeated)."""
    t, k, m = features.shape
    bands = bands or m
    pooled = features.reshape(t, k, bands, m // bands).mean(-1).reshape(t, -1)
    idx = np.clip(np.arange(t)[:, None] + lag + np.arange(-context, context + 1)[None, :], 0, t - 1)
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
    source: str = "mel"       # which features ("mel" or "visemes"); models before format 3: mel
    lag: int = 0
    gain: float = 1.0         # amplitude about offset_mean (chosen by cross-validation; before format 4: 1)

    def predict_offsets(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """Audio features by source ({"mel": (T, 4, 80), "visemes": ...}) -> (T, 68, 3) landmark
        offsets in face-scale units (smoothed)."""
        x = (audio_windows(features[self.source], self.bands, self.context, self.lag) - self.feat_mean) / self.feat_std
        if self.kind == "knn":
            out = _knn(self.weights, self.basis, x, self.neighbours)
        else:
            out = self.offset_mean + (x @ self.weights[:-1] + self.weights[-1]) @ self.basis
        out = _amplified(gaussian_smooth(out, self.smoothing), self.offset_mean, self.gain)
        return out.reshape(-1, 68, 3).astype(np.float32)

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.source,)

    def describe(self) -> dict:
        """The selected setting, for eval.json."""
        return {"source": self.source, "kind": self.kind, "neighbours": self.neighbours, "bands": self.bands,
                "context": self.context, "lag": self.lag,
                "components": int(self.basis.shape[0]) if self.kind == "ridge" else None,
                "smoothing": self.smoothing, "ridge": self.ridge, "gain": self.gain, "cv_score": round(self.cv_score, 4)}

    def to_dict(self) -> dict:
        return {"format": 4, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "MotionModel":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class MotionEnsemble:
    """The mean of the best model of each feature source, used when cross-validation scores the
    mean better than any one of them (their errors differ: log-mel hears loudness and timing,
    visemes the lip shapes of phones)."""

    members: list[MotionModel]
    cv_score: float
    kind: str = "ensemble"
    gain: float = 1.0  # of the mean, about the members' offset_mean (their own gains stay 1)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(m.source for m in self.members)

    @property
    def subjects(self) -> list[str]:
        return self.members[0].subjects

    def predict_offsets(self, features: dict[str, np.ndarray]) -> np.ndarray:
        mean = np.mean([m.predict_offsets(features) for m in self.members], axis=0)
        centre = self.members[0].offset_mean.reshape(68, 3)
        return _amplified(mean, centre, self.gain).astype(np.float32)

    def describe(self) -> dict:
        return {"kind": "ensemble", "gain": self.gain, "cv_score": round(self.cv_score, 4),
                "members": [m.describe() for m in self.members]}

    def to_dict(self) -> dict:
        return {"format": 4, "kind": "ensemble", "cv_score": self.cv_score, "gain": self.gain,
                "members": [m.to_dict() for m in self.members]}


def model_from_dict(d: dict) -> MotionModel | MotionEnsemble:
    """A saved motion model (``to_dict``; also the log-mel models saved before format 3)."""
    if d.get("kind") == "ensemble":
        return MotionEnsemble([MotionModel.from_dict(m) for m in d["members"]], float(d["cv_score"]),
                              gain=float(d.get("gain", 1.0)))
    return MotionModel.from_dict(d)


@dataclass
class MotionData:
    """One subject's frames for motion training: features by source, each (T, 4, C); landmark
    offsets from the subject's neutral shape (T, 68, 3) and that shape (68, 3), both in face-scale
    units; and which frames to learn from."""

    name: str
    features: dict[str, np.ndarray]
    offsets: np.ndarray
    neutral: np.ndarray
    use: np.ndarray


class _RidgePath:
    """Ridge fits of centred y on centred x for many strengths from one eigendecomposition: of
    x^T x when there are more frames than features, else of x x^T (the dual)."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x_mean, self.y_mean = x.mean(0), y.mean(0)
        xc, yc = x - self.x_mean, y - self.y_mean
        self.dual = xc.shape[0] < xc.shape[1]
        gram = xc @ xc.T if self.dual else xc.T @ xc
        self.s, self.v = np.linalg.eigh(gram)
        self.xc, self.vty = xc, self.v.T @ (yc if self.dual else xc.T @ yc)

    def weights(self, lam: float) -> np.ndarray:
        """(D + 1, Y) weights, the last row the bias."""
        coef = self.v @ (self.vty / (np.maximum(self.s, 0.0) + lam)[:, None])
        w = self.xc.T @ coef if self.dual else coef
        return np.concatenate([w, (self.y_mean - self.x_mean @ w)[None]], axis=0)


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


def _amplified(offsets: np.ndarray, centre: np.ndarray, gain: float) -> np.ndarray:
    """Offsets scaled by ``gain`` about ``centre`` (the mean offset)."""
    return offsets if gain == 1 else centre + (offsets - centre) * np.float32(gain)


def _select_gain(oof: np.ndarray, ys: np.ndarray, neutral: np.ndarray, splits: list, centre: np.ndarray,
                 gains: tuple[float, ...]) -> tuple[float, float]:
    """The gain (and its CV score) that best scales out-of-fold predictions ``oof`` about ``centre``.

    Regressors predict the conditional mean, so their mouths move less than real ones (about half
    as much on the fixture). _sync_score's error term then decides how much amplitude the
    predictions' timing earns: scaling a well-timed prediction up brings it closer to the truth,
    scaling a badly timed one up moves it further away."""
    best = (1.0, float("inf"))
    for g in sorted(gains):
        score = _cv_score(_amplified(oof, centre, g), ys, neutral, splits)
        if score < best[1] - 1e-9:
            best = (float(g), score)
    return best


def _cv_score(oof: np.ndarray, ys: np.ndarray, neutral: np.ndarray, splits: list) -> float:
    """Mean _sync_score over the folds of out-of-fold predictions ``oof`` of the selection frames."""
    return float(np.mean([_sync_score(oof[te], ys[te], neutral[te], base) for _, te, base in splits]))


def _mouth_err(pred_offsets: np.ndarray, true_offsets: np.ndarray) -> float:
    p = pred_offsets.reshape(len(pred_offsets), 68, 3)[:, MOUTH]
    t = true_offsets.reshape(len(true_offsets), 68, 3)[:, MOUTH]
    return float(np.linalg.norm(p - t, axis=-1).mean())


def _sync_score(pred_offsets: np.ndarray, true_offsets: np.ndarray, neutral: np.ndarray, mean_err: float) -> float:
    """What cross-validation minimises: mouth landmark error relative to the mean expression's,
    minus the correlation of the mouth opening with the truth. Landmark error alone rewards a
    mouth that does not move (the mean); lip sync is the opening following the speech. The
    opening is measured on the shapes (``neutral`` + offsets, per frame), not on the offsets."""
    p = neutral + pred_offsets.reshape(len(pred_offsets), 68, 3)
    t = neutral + true_offsets.reshape(len(true_offsets), 68, 3)
    a, b = mouth_opening(p), mouth_opening(t)
    corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 1e-9 and b.std() > 1e-9 else 0.0
    return _mouth_err(pred_offsets, true_offsets) / max(mean_err, 1e-9) - corr


def _standardisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread that standardise windows (the floor keeps constant channels finite)."""
    return x.mean(0), x.std(0) + 1e-3


def _predictor(kind: str, param: float, k: int, xtr: np.ndarray, ytr: np.ndarray, basis: dict[int, np.ndarray],
               offset_mean: np.ndarray):
    """One regressor setting fitted on (xtr, ytr): a function of the query windows."""
    if kind == "knn":
        return lambda xte: _knn(xtr, ytr, xte, int(param))
    return _ridge_predictor(_RidgePath(xtr, (ytr - offset_mean) @ basis[k].T).weights(param), basis[k], offset_mean)


def _ridge_predictor(w: np.ndarray, b: np.ndarray, offset_mean: np.ndarray):
    return lambda xte: offset_mean + (xte @ w[:-1] + w[-1]) @ b


def _candidates(cfg: MotionConfig, xtr: np.ndarray, ytr: np.ndarray, basis: dict[int, np.ndarray],
                offset_mean: np.ndarray):
    """Every regressor setting's predictor fitted on (xtr, ytr): yields (kind, param, K, predict)."""
    if "knn" in cfg.kinds:
        for nb in cfg.neighbours:
            yield "knn", nb, 0, _predictor("knn", nb, 0, xtr, ytr, basis, offset_mean)
    if "ridge" in cfg.kinds:
        for k, b in basis.items():
            path = _RidgePath(xtr, (ytr - offset_mean) @ b.T)  # one decomposition for every strength
            for lam in cfg.ridge:
                yield "ridge", lam, k, _ridge_predictor(path.weights(lam), b, offset_mean)


def fit(datasets: list[MotionData], cfg: MotionConfig = MotionConfig(),
        progress_bar=None) -> MotionModel | MotionEnsemble:
    """Select the setting by cross-validation on the ``use`` frames, then fit on all of them."""
    from . import phonetic

    sources = tuple(s for s in cfg.sources if s in datasets[0].features and (s != "visemes" or phonetic.available()))
    ys = np.concatenate([d.offsets[d.use].reshape(len(d.use), -1) for d in datasets]).astype(np.float64)
    neutral = np.concatenate([np.broadcast_to(d.neutral, (len(d.use), 68, 3)) for d in datasets])
    offset_mean = ys.mean(0)
    _, _, vt = np.linalg.svd(ys - offset_mean, full_matrices=False)
    basis = {k: (vt[: min(k, vt.shape[0])] if k > 0 else np.eye(ys.shape[1])) for k in cfg.components}
    # contiguous blocks per subject as folds: neighbouring frames are too alike to test each other
    fold = np.concatenate([np.arange(len(d.use)) * cfg.folds // max(1, len(d.use)) for d in datasets])
    step = -(-len(ys) // cfg.cv_max_frames)
    sub = np.arange(0, len(ys), step)  # every step-th frame for selection (smoothing: sigma / step)
    fold_s, ys_s, neutral_s = fold[sub], ys[sub], neutral[sub]
    # each fold's (train, test) masks of the selection frames and the mean expression's error there
    splits = [(fold_s != f, fold_s == f) for f in range(cfg.folds)]
    splits = [(tr, te, _mouth_err(np.broadcast_to(ys_s[tr].mean(0), ys_s[te].shape), ys_s[te]))
              for tr, te in splits if te.any() and tr.sum() >= 2]

    def windows(src, bands, context, lag):
        return np.concatenate([audio_windows(d.features[src], bands, context, lag)[d.use] for d in datasets]).astype(np.float64)

    scores: dict[tuple, list[float]] = {}
    for src, bands, context, lag in cfg.windows(sources):
        x = windows(src, bands, context, lag)[sub]
        for tr, te, base in splits:
            mu, sd = _standardisation(x[tr])
            xtr, xte = (x[tr] - mu) / sd, (x[te] - mu) / sd
            for kind, param, k, predict in _candidates(cfg, xtr, ys_s[tr], basis, offset_mean):
                pred = predict(xte)
                for sm in cfg.smoothing:
                    score = _sync_score(gaussian_smooth(pred, sm / step), ys_s[te], neutral_s[te], base)
                    scores.setdefault((src, bands, context, lag, kind, param, k, sm), []).append(score)
        if progress_bar is not None:
            progress_bar.advance()
    mean_scores = {key: float(np.mean(v)) for key, v in scores.items()}
    best = min(mean_scores, key=mean_scores.get)
    names = [d.name for d in datasets]

    def final(key) -> MotionModel:
        """The setting ``key`` fitted on every frame."""
        src, bands, context, lag, kind, param, k, sm = key
        x = windows(src, bands, context, lag)
        mu, sd = _standardisation(x)
        xn = (x - mu) / sd
        stats = (mu.astype(np.float32), sd.astype(np.float32))
        if kind == "knn":
            return MotionModel("knn", param, bands, context, sm, 0.0, *stats, xn.astype(np.float32),
                               ys.astype(np.float32), offset_mean.astype(np.float32), names, mean_scores[key], src, lag)
        w = _RidgePath(xn, (ys - offset_mean) @ basis[k].T).weights(param)
        return MotionModel("ridge", 0, bands, context, sm, param, *stats, w.astype(np.float32),
                           basis[k].astype(np.float32), offset_mean.astype(np.float32), names, mean_scores[key], src,
                           lag)

    def out_of_fold(key) -> np.ndarray:
        """The setting's smoothed cross-validation predictions of the selection frames."""
        src, bands, context, lag, kind, param, k, sm = key
        x = windows(src, bands, context, lag)[sub]
        pred = np.zeros_like(ys_s)
        for tr, te, _ in splits:
            mu, sd = _standardisation(x[tr])
            predict = _predictor(kind, param, k, (x[tr] - mu) / sd, ys_s[tr], basis, offset_mean)
            pred[te] = gaussian_smooth(predict((x[te] - mu) / sd), sm / step)
        return pred

    # the best setting of each source, averaged: kept when cross-validation scores it better
    per_source = [min((key for key in mean_scores if key[0] == src), key=mean_scores.get)
                  for src in sources if any(key[0] == src for key in mean_scores)]
    oofs = {key: out_of_fold(key) for key in per_source}  # best is one of them
    avg = np.mean(list(oofs.values()), axis=0)
    score = _cv_score(avg, ys_s, neutral_s, splits)
    if len(per_source) > 1 and score < mean_scores[best]:
        model, oof = MotionEnsemble([final(key) for key in per_source], score), avg
    else:
        model, oof = final(best), oofs[best]
    # then the amplitude, on the chosen model's out-of-fold predictions
    model.gain, model.cv_score = _select_gain(oof, ys_s, neutral_s, splits, offset_mean, cfg.gains)
    return model


def mouth_error(pred: np.ndarray, true: np.ndarray, scale: float) -> float:
    """Mean distance of the mouth landmarks (48-67), in millimetres (``scale``: metres per unit)."""
    return float(np.linalg.norm((pred[:, MOUTH] - true[:, MOUTH]) * scale, axis=-1).mean() * 1000)


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """Inner-lip opening (iBUG 62 to 66 distance) per frame."""
    return np.linalg.norm(landmarks[:, 62] - landmarks[:, 66], axis=-1)

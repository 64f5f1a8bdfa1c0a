"""Matting on real fixture frames: alpha, head/torso masks, background plate, outputs, preview."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import CLIP, VFR_CLIP
from talkcli.media.decode import iter_frames
from talkcli.media.probe import probe
from talkcli.preprocess import matting
from talkcli.preprocess.landmarks import track

SIZE = 256
FPS = 5  # a frame every 0.2 s: the whole clip in a few dozen frames


class Counter:
    def __init__(self):
        self.n = 0

    def advance(self, n=1):
        self.n += n


def _workspace(root: Path, video: Path) -> dict:
    """Frames written as the workspace writes them (cv2 PNG), their landmarks and the matting."""
    frames_dir = root / "frames"
    frames_dir.mkdir(parents=True)
    frames = []
    for i, rgb in enumerate(iter_frames(probe(video), FPS, size=SIZE)):
        cv2.imwrite(str(frames_dir / f"{i:06d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        frames.append(rgb.copy())
    lms = track(iter(frames), len(frames)).arrays()
    assert lms["ok"].all()
    paths = [frames_dir / f"{i:06d}.png" for i in range(len(frames))]
    out = root / "matting"
    bar = Counter()
    summary = matting.run_matting((p for p in paths), lms["points"], lms["ok"], out, bar)  # a generator
    return {"frames": frames, "paths": paths, "points": lms["points"], "ok": lms["ok"], "out": out,
            "summary": summary, "progress": bar.n}


@pytest.fixture(scope="module", params=["vfr700", "clip512"])
def ws(request, tmp_path_factory):
    video = VFR_CLIP if request.param == "vfr700" else CLIP
    data = _workspace(tmp_path_factory.mktemp(request.param), video)
    data["name"] = request.param
    return data


def _read(path: Path, flags=cv2.IMREAD_UNCHANGED) -> np.ndarray:
    img = cv2.imread(str(path), flags)
    assert img is not None, path
    return img


def _masks(ws) -> tuple[list[np.ndarray], list[np.ndarray]]:
    n = len(ws["paths"])
    alpha = [_read(ws["out"] / "alpha" / f"{i:06d}.png") for i in range(n)]
    labels = [_read(ws["out"] / "masks" / f"{i:06d}.png") for i in range(n)]
    return alpha, labels


def test_outputs_names_dtypes_and_summary(ws):
    n = len(ws["paths"])
    out = ws["out"]
    assert sorted(p.name for p in (out / "alpha").iterdir()) == [f"{i:06d}.png" for i in range(n)]
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"{i:06d}.png" for i in range(n)]
    alpha, labels = _masks(ws)
    for a, lab in zip(alpha, labels):
        assert a.dtype == np.uint8 and a.shape == (SIZE, SIZE)
        assert lab.dtype == np.uint8 and lab.shape == (SIZE, SIZE)
        assert set(np.unique(lab)) <= {0, 1, 2}
        # labels are the thresholded alpha: person where alpha >= 0.5
        assert np.mean((lab > 0) != (a >= 128)) < 1e-3
    bg = _read(out / "bg.png")
    assert bg.dtype == np.uint8 and bg.shape == (SIZE, SIZE, 3)
    holes = _read(out / "bg_inpainted.png")
    assert holes.dtype == np.uint8 and holes.shape == (SIZE, SIZE)
    assert set(np.unique(holes)) <= {0, 255}

    s = ws["summary"]
    for key in ("person_fraction", "head_fraction", "torso_fraction", "inpainted_fraction", "seconds_per_frame"):
        assert isinstance(s[key], float), key
    assert s["frames"] == n and ws["progress"] == n
    assert s["person_fraction"] == pytest.approx(s["head_fraction"] + s["torso_fraction"], abs=2e-4)
    assert s["inpainted_fraction"] == pytest.approx(np.mean(holes > 0), abs=1e-4)
    assert 0.3 < s["person_fraction"] < 0.8 and s["head_fraction"] > 0.1


def test_alpha_person_and_background(ws):
    alpha, _ = _masks(ws)
    for a, pts in zip(alpha, ws["points"]):
        x, y = np.round(pts[1, :2]).astype(int)  # nose tip
        assert a[y, x] >= 0.95 * 255
        if ws["name"] == "vfr700":  # a man in a suit before a light wall: the top corners are wall
            assert a[:8, :8].mean() <= 0.05 * 255 and a[:8, -8:].mean() <= 0.05 * 255

    with matting.Matter() as m:
        f = m(ws["frames"][0])
    assert f.dtype == np.float32 and f.shape == (SIZE, SIZE)
    assert f.min() >= 0.0 and f.max() <= 1.0
    assert np.mean((f > 0.05) & (f < 0.95)) < 0.06  # a matte, not a blur: few undecided pixels


def test_head_covers_face_and_hair(ws):
    _, labels = _masks(ws)
    hit = total = 0
    for lab, pts in zip(labels, ws["points"]):
        xy = np.round(pts[:468, :2]).astype(int)
        xy = xy[((xy >= 0) & (xy < SIZE)).all(axis=1)]
        hit += int(np.count_nonzero(lab[xy[:, 1], xy[:, 0]] == matting.HEAD))
        total += len(xy)
        # hair: head pixels well above the highest landmark
        height = float(np.linalg.norm(pts[10, :2] - pts[152, :2]))
        top = float(pts[:468, 1].min())
        ys = np.nonzero(lab == matting.HEAD)[0]
        assert ys.min() < top - 0.15 * height
    assert hit / total >= 0.98


def test_torso_below_chin(ws):
    _, labels = _masks(ws)
    below = total = 0
    for lab, pts in zip(labels, ws["points"]):
        ys = np.nonzero(lab == matting.TORSO)[0]
        below += int(np.count_nonzero(ys > pts[152, 1]))
        total += len(ys)
    assert total > 0
    assert below / total >= 0.95
    if ws["name"] == "vfr700":  # the suit is torso, the collar and tie too
        assert ws["summary"]["torso_fraction"] > 0.2


def test_background_plate_matches_background(ws):
    plate = cv2.cvtColor(_read(ws["out"] / "bg.png", cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32)
    alpha, _ = _masks(ws)
    kernel = np.ones((5, 5), np.uint8)
    errors = []
    for rgb, a in zip(ws["frames"], alpha):
        bg = cv2.erode((a < 0.05 * 255).astype(np.uint8), kernel) > 0
        assert bg.mean() > 0.1
        errors.append(float(np.abs(rgb.astype(np.float32) - plate)[bg].mean()))
    assert max(errors) < 8.0, errors
    assert ws["summary"]["inpainted_fraction"] < 0.6


def test_contact_sheet(ws, tmp_path):
    path = tmp_path / ".matting.tmp.png"
    matting.contact_sheet(ws["paths"], ws["out"], path)
    sheet = _read(path, cv2.IMREAD_COLOR)
    assert sheet.shape == (5 * 256, 4 * 256, 3)


@pytest.fixture(scope="module")
def vfr_few(tmp_path_factory):
    """Six frames of the 700 clip with their landmarks."""
    root = tmp_path_factory.mktemp("few")
    frames = [f.copy() for f in iter_frames(probe(VFR_CLIP), FPS, size=SIZE, n_frames=6)]
    paths = []
    for i, rgb in enumerate(frames):
        paths.append(root / f"{i:06d}.png")
        cv2.imwrite(str(paths[-1]), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    lms = track(iter(frames), len(frames)).arrays()
    return root, paths, lms["points"], lms["ok"]


def test_frames_without_landmarks_use_nearest_face(vfr_few):
    root, paths, true_pts, ok = vfr_few
    points = true_pts.copy()
    ok = ok.copy()
    points[2:4] = np.nan
    ok[2:4] = False
    s = matting.run_matting(paths, points, ok, root / "gap", None)
    assert s["frames_without_face"] == 2
    for i in (2, 3):
        lab = _read(root / "gap" / "masks" / f"{i:06d}.png")
        xy = np.round(true_pts[i, :468, :2]).astype(int)
        assert np.mean(lab[xy[:, 1], xy[:, 0]] == matting.HEAD) > 0.95  # a static speaker
    assert list(matting.nearest_tracked(np.array([0, 0, 1, 0, 0, 0, 1, 0], bool))) == [2, 2, 2, 2, 2, 6, 6, 6]
    assert list(matting.nearest_tracked(np.zeros(3, bool))) == [-1, -1, -1]


def test_no_landmarks_at_all_is_all_torso(vfr_few):
    root, paths, points, ok = vfr_few
    s = matting.run_matting(iter(paths[:2]), np.full_like(points[:2], np.nan), np.zeros(2, bool), root / "none")
    assert s["head_fraction"] == 0.0 and s["torso_fraction"] > 0.3
    lab = _read(root / "none" / "masks" / "000000.png")
    assert set(np.unique(lab)) == {0, 1}

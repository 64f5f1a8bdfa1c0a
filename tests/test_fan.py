"""The FAN (face-alignment) landmark backend's geometry, with synthetic models: no real weights here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from talkcli.errors import InputError, MissingModel
from talkcli.preprocess.fan import (
    FanLandmarks, crop, crop_params, decode_heatmaps, face_box_from_mesh, load_fan, transform_points,
)

FIXTURE = Path("/work/shared/fixtures/talking-head-512.mp4")


def gaussian_maps(peaks: np.ndarray, size: int = 64, sigma: float = 1.5) -> np.ndarray:
    """(N, size, size) Gaussians centred at pixel-index positions ``peaks`` (N, 2) = (x, y)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    d2 = (xx[None] - peaks[:, 0, None, None]) ** 2 + (yy[None] - peaks[:, 1, None, None]) ** 2
    return np.exp(-d2 / (2 * sigma**2)).astype(np.float32)


def test_decode_heatmaps_subpixel():
    rng = np.random.default_rng(1)
    peaks = rng.uniform(3, 60, size=(2, 68, 2))
    hm = np.stack([gaussian_maps(p) for p in peaks])
    out = decode_heatmaps(torch.from_numpy(hm))
    assert out.shape == (2, 68, 2)
    # face-alignment's frame puts pixel index i at [i, i + 1): the peak at index u decodes to u + 0.5
    err = np.abs(out - (peaks + 0.5))
    assert err.max() < 0.3, err.max()


def test_crop_transform_round_trip():
    # Points are pixel indices; the FAN frame is continuous (pixel i spans [i, i + 1)), hence +-0.5.
    # face-alignment's crop (integer window corners, window one crop pixel short of 200 * scale)
    # and its point transform disagree by up to 200 * scale / 256 image pixels (one crop pixel,
    # largest at the top left). crop() reproduces that crop, so the box here keeps 200 * scale
    # under 256 px, where the round trip must hold to 1 px.
    h, w = 300, 400
    pts = np.array([[150.0, 110.0], [205.0, 150.0], [250.0, 190.0], [160.0, 195.0], [240.0, 105.0]])
    img = np.zeros((h, w, 3), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for x, y in pts:
        img[..., 0] = np.maximum(img[..., 0], 255 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0))
    center, scale = crop_params((140.0, 90.0, 260.0, 210.0))
    assert 200 * scale < 256
    patch = crop(img, center, scale, 256).astype(np.float64)[..., 0]
    predicted = transform_points(pts + 0.5, center, scale, 256) - 0.5
    cy, cx = np.mgrid[0:256, 0:256]
    for p_img, p_crop in zip(pts, predicted):
        win = (np.abs(cx - p_crop[0]) < 12) & (np.abs(cy - p_crop[1]) < 12)
        wgt = patch * win
        found = np.array([(wgt * cx).sum(), (wgt * cy).sum()]) / wgt.sum()
        back = transform_points(found + 0.5, center, scale, 256, invert=True) - 0.5
        assert np.abs(back - p_img).max() < 1.0, (back, p_img)


class _FakeFan(torch.nn.Module):
    """Ignores the picture; returns Gaussian heatmaps at fixed heatmap positions."""

    def __init__(self, peaks: np.ndarray):
        super().__init__()
        self.register_buffer("peaks", torch.tensor(peaks, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != 256 or x.shape[3] != 256:
            raise ValueError("expected (B, 3, 256, 256)")
        if bool(x.max() > 1.0) or bool(x.min() < 0.0):
            raise ValueError("expected values in [0, 1]")
        grid = torch.arange(64, dtype=torch.float32)
        gx = (grid[None, :] - self.peaks[:, 0:1]) ** 2  # (68, 64)
        gy = (grid[None, :] - self.peaks[:, 1:2]) ** 2
        hm = torch.exp(-(gy[:, :, None] + gx[:, None, :]) / 4.5)
        return hm[None].repeat(x.shape[0], 1, 1, 1)


@pytest.fixture(scope="module")
def frame_and_mesh():
    if not FIXTURE.exists():
        pytest.skip("fixture video missing")
    from talkcli.media.decode import iter_frames
    from talkcli.media.probe import probe
    from talkcli.preprocess.landmarks import FaceMesh

    rgb = next(iter_frames(probe(FIXTURE), 25, n_frames=1))
    mesh = FaceMesh()
    try:
        pts = mesh(rgb)[0]
    finally:
        mesh.close()
    assert pts is not None
    return rgb, pts


def test_fan_landmarks_end_to_end(tmp_path, frame_and_mesh):
    from talkcli.preprocess.facemodel.mesh import IBUG68

    rgb, pts478 = frame_and_mesh
    box = face_box_from_mesh(pts478)
    x0, y0, x1, y1 = box
    assert x0 < pts478[IBUG68, 0].min() + 1 and x1 > pts478[IBUG68, 0].max() - 1
    assert y0 < pts478[IBUG68[17:27], 1].min() and y1 > pts478[IBUG68[8], 1]
    center, scale = crop_params(box)
    # put the fake network's peaks where the mediapipe 68 subset falls in heatmap pixels
    target = pts478[IBUG68, :2].astype(np.float64)
    peaks = transform_points(target, center, scale, 64) - 0.5
    assert peaks.min() > 1 and peaks.max() < 62
    torch.jit.save(torch.jit.script(_FakeFan(peaks)), str(tmp_path / "2DFAN4-test.zip"))

    fan = FanLandmarks(tmp_path, device="cpu")
    out = fan(rgb, pts478)
    assert out.shape == (68, 2) and out.dtype == np.float32
    # exactly what the decoded heatmaps map to ...
    hm = _FakeFan(peaks)(torch.zeros(1, 3, 256, 256))
    expected = transform_points(decode_heatmaps(hm)[0], center, scale, 64, invert=True)
    np.testing.assert_allclose(out, expected, atol=1e-3)
    # ... which is the mediapipe subset to within the decoder's quarter heatmap pixel
    px = 200.0 * scale / 64
    assert np.abs(out - target).max() <= 0.3 * px + 1e-3, (np.abs(out - target).max(), px)
    # batched call agrees
    both = fan.batch([rgb, rgb], [pts478, pts478])
    np.testing.assert_allclose(both[1], out, atol=1e-4)


def test_missing_weights(tmp_path):
    with pytest.raises(MissingModel) as e:
        load_fan(tmp_path)
    assert "2DFAN4" in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(MissingModel):
        FanLandmarks(tmp_path / "nothing-here")


def test_unreadable_weights(tmp_path):
    (tmp_path / "2DFAN4-bad.zip").write_bytes(b"not a zip")
    with pytest.raises(InputError):
        load_fan(tmp_path)


def test_cli_face_alignment_backend_end_to_end(tmp_path):
    """--landmarks face-alignment puts FAN's points in landmarks.npz 'ibug68' (fake FAN weights).

    The stand-in network answers a fixed heatmap for every face, so the check is the wiring: the
    option finds the checkpoint, the landmark stage runs FAN per tracked frame and records it.
    """
    import json

    import numpy as np
    import torch

    from conftest import CLIP, talk

    class Flat(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hm = torch.zeros(x.shape[0], 68, 64, 64)
            hm[:, :, 32, 32] = 1.0  # every point at the crop centre
            return hm

    weights = tmp_path / "fan"
    weights.mkdir()
    torch.jit.save(torch.jit.script(Flat()), str(weights / "2DFAN4-test.zip"))
    ws = tmp_path / "ws"
    missing = talk("--quiet", "preprocess", CLIP, "-w", ws, "--landmarks", "face-alignment", "--landmarks-model",
                   tmp_path / "nowhere")
    assert missing.returncode == 5 and "2DFAN4" in missing.stderr and not ws.exists()
    proc = talk("preprocess", CLIP, "-w", ws, "--size", "128", "--landmarks", "face-alignment",
                "--landmarks-model", weights, "--json")
    assert proc.returncode == 0, proc.stderr
    lm = np.load(ws / "landmarks.npz")
    assert str(lm["ibug68_backend"]) == "face-alignment"
    ok = lm["ok"]
    xy = lm["ibug68"][ok, :, :2]
    assert np.allclose(xy, xy[:, :1], atol=1e-3)  # all 68 at one point per frame: FAN's answer, not mediapipe's
    nose = lm["points"][ok, 1, :2]
    assert np.median(np.linalg.norm(xy[:, 0] - nose, axis=1)) < 20  # the crop centre is on the face
    assert json.loads(proc.stdout)["quality"]["tracked_fraction"] >= 0.98

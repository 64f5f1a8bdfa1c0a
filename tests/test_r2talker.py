"""R2-Talker: M-AGLO, progressive levels, training on the real fixture, resume, train/eval CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import CLIP, interrupt_at, talk
from talkcli.avatar.config import load_preset
from talkcli.avatar.data import load_subject
from talkcli.avatar.fields import ConditionedMLP
from talkcli.workspace import Workspace


@pytest.fixture(scope="module")
def ws128(tmp_path_factory):
    """The 8 s fixture preprocessed once at 128²; tests that change it work on copies."""
    root = tmp_path_factory.mktemp("r2t")
    ws = root / "ws"
    talk("preprocess", CLIP, "-w", ws, "--size", "128", "--json", check=True, timeout=600)
    return ws


def _copy(ws, tmp_path):
    dst = tmp_path / "ws"
    shutil.copytree(ws, dst, symlinks=True)
    return dst


# --------------------------------------------------------------------------- model pieces


def test_maglo_with_zero_affine_is_the_plain_mlp():
    torch.manual_seed(0)
    mlp = ConditionedMLP(in_dim=7, hidden=16, layers=2, out_dim=5, cond_dim=3, mode="maglo")
    x, cond = torch.randn(50, 7), torch.randn(4, 3)
    index = torch.randint(0, 4, (50,))

    def plain(x):
        h = x
        for layer in mlp.hidden:
            h = torch.relu(layer(h))
        return mlp.out(h)

    torch.testing.assert_close(mlp(x, cond, index), plain(x))  # zero-initialised affine FCs
    with torch.no_grad():
        for fc in mlp.affine:
            fc.weight.normal_()
    out = mlp(x, cond, index)
    assert not torch.allclose(out, plain(x), atol=1e-3)
    # each sample follows its own frame's condition: I = I_hat * (1 + beta) + alpha
    alpha, beta = mlp.modulation(cond)[0]
    h0 = mlp.hidden[0](x)
    torch.testing.assert_close(torch.relu(h0 * (1 + beta[index]) + alpha[index]),
                               torch.relu(torch.addcmul(alpha[index], h0, 1 + beta[index])))


def test_progressive_levels_follow_the_schedule():
    from talkcli.avatar.r2talker import R2Talker

    preset = load_preset("r2talker-tiny")
    m = preset.model
    model = R2Talker(m, (-0.1, -0.1, -0.1, 0.1, 0.1, 0.1), (np.zeros(3), np.ones(3)), np.zeros(12), 64)
    total, every = 240_000, 5000
    for it, expect in ((0, 4), (4999, 4), (5000, 5), (12_345, 6), (20_000, 8), (239_999, 8)):
        model.set_progress(it, total, every)
        assert int(model.active_levels) == min(m.pos_levels, expect)
    model.set_progress(0, 480, every)  # scaled: one more level every 10 iterations
    assert int(model.active_levels) == 4
    model.set_progress(25, 480, every)
    mask = model.level_mask()
    assert mask.tolist() == [True] * 6 + [False] * 2
    x = torch.rand(33, 3) * 0.2 - 0.1
    feat = model.head.grid(model.head.normalise(x), mask)
    f = m.pos_features
    assert feat[:, 6 * f:].abs().max() == 0 and feat[:, :6 * f].abs().max() > 0
    model.set_progress(10_000, 480, every)
    assert model.level_mask() is None  # every level on


def test_presets_load_and_override():
    p = load_preset("r2talker-paper")
    assert (p.model.pos_levels, p.model.pos_features, p.model.pos_log2_table, p.model.pos_base,
            p.model.pos_finest) == (16, 4, 16, 32.0, 2048.0)
    assert (p.model.lmk_levels, p.model.lmk_features, p.train.iterations) == (16, 2, 240_000)
    q = load_preset("r2talker-cpu", ["train.iterations=10", "model.conditioning=concat"])
    assert q.train.iterations == 10 and q.model.conditioning == "concat"
    from talkcli.errors import UsageError

    with pytest.raises(UsageError, match="unknown field"):
        load_preset("r2talker-cpu", ["train.iteratons=10"])
    with pytest.raises(UsageError, match="must be a int"):
        load_preset("r2talker-cpu", ["train.iterations=ten"])


# --------------------------------------------------------------------------- training on the fixture


def _trainer(ws_path, preset):
    from talkcli.train import UPSTREAM, Trainer

    ws = Workspace(ws_path)
    data = load_subject(ws, preset.train.size)
    train_idx, hold_idx = data.split(preset.train.holdout_fraction)
    upstream = {n: ws.record(n)["output_key"] for n in UPSTREAM}
    return Trainer(ws, preset, data, train_idx, hold_idx, upstream)


def test_tiny_preset_learns_the_training_frames(ws128, tmp_path):
    ws = _copy(ws128, tmp_path)
    preset = load_preset("r2talker-tiny", ["train.torso_iterations=0", "train.val_every=100000"])
    tr = _trainer(ws, preset)
    before = tr.validate(0, torso=False)["train_psnr"]
    summary = tr.run()
    after = summary["train_psnr"]
    assert after >= before + 3.0, (before, after)
    assert summary["holdout_frames"] == [180, 199]
    assert (ws / "models/r2talker/loss.png").stat().st_size > 1000
    assert list((ws / "models/r2talker/val").glob("*.png"))
    assert summary["occupied_fraction"] < 1.0  # the occupancy grid pruned empty space
    _rendering_with_early_termination_matches_all_samples(tr)


def _rendering_with_early_termination_matches_all_samples(tr):
    """render_frame (rounds, early termination) against render_rays (every sample at once)."""
    from talkcli.avatar.data import windows
    from talkcli.avatar.render import render_frame, render_rays
    from talkcli.avatar.torso import pose_vector

    d, model = tr.data, tr.model
    f = int(tr.hold_idx[3])
    win = windows(d.n_frames, np.array([f]), model.cfg.window)[0]
    fast, _ = render_frame(model, d.rotation[f], d.translation[f], d.landmarks[win], d.background, d.focal,
                           d.cx, d.cy)
    s = d.size
    vv, uu = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij")
    r = s * s
    with torch.no_grad():
        cond = model.condition(torch.from_numpy(d.landmarks[win][None]))
        pose = torch.from_numpy(pose_vector(d.rotation[f][None], d.translation[f][None])[0])
        ref = render_rays(model, torch.from_numpy(d.rotation[f]).expand(r, 3, 3),
                          torch.from_numpy(d.translation[f]).expand(r, 3), uu.reshape(-1), vv.reshape(-1), d.focal,
                          d.cx, d.cy, cond, torch.zeros(r, dtype=torch.long),
                          torch.from_numpy(d.background).reshape(-1, 3), pose.expand(r, -1), s)
    ref = ref.rgb.reshape(s, s, 3).clamp(0, 1).numpy()
    assert np.abs(fast - ref).max() < 5e-3 and np.abs(fast - ref).mean() < 1e-4


def test_interrupted_training_resumes_at_the_same_iteration_and_optimizer_state(ws128, tmp_path):
    ws = _copy(ws128, tmp_path)
    preset = load_preset("r2talker-tiny", ["train.iterations=40", "train.torso_iterations=10",
                                           "train.checkpoint_every=1000", "train.val_every=100000"])
    tr = _trainer(ws, preset)
    interrupt_at(tr, 23)
    assert tr.state.iteration == 23
    saved_params = {k: v.clone() for k, v in tr.model.state_dict().items()}
    saved_opt = tr.head_opt.state_dict()
    fresh = _trainer(ws, preset)
    assert fresh.try_resume()
    assert fresh.state.iteration == 23
    for k, v in fresh.model.state_dict().items():
        torch.testing.assert_close(v, saved_params[k], rtol=0, atol=0)
    new_opt = fresh.head_opt.state_dict()
    assert new_opt["state"].keys() == saved_opt["state"].keys()
    for k, s in saved_opt["state"].items():
        assert int(new_opt["state"][k]["step"]) == int(s["step"]) == 23
        torch.testing.assert_close(new_opt["state"][k]["exp_avg"], s["exp_avg"], rtol=0, atol=0)
    # the next step is the one that would have come: same batch, same result as an uninterrupted run
    ref = _trainer(ws, preset)
    ref.ws = Workspace(tmp_path / "unused")
    for it in range(23):
        ref.update_occupancy(it)
        ref.step(it)
    fresh.update_occupancy(23)
    ref.update_occupancy(23)
    a, b = fresh.step(23), ref.step(23)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    summary = fresh.run()
    assert summary["iterations"] == 50


def test_talk_train_resumes_then_skips_and_eval_reports(ws128, tmp_path):
    ws = _copy(ws128, tmp_path)
    args = ("--preset", "r2talker-tiny", "--set", "train.iterations=60", "--set", "train.torso_iterations=20")
    out = json.loads(talk("--quiet", "train", ws, *args, "--json", check=True, timeout=600).stdout)
    assert not out["skipped"] and out["iterations"] == 80 and (ws / "models/r2talker/model.pt").is_file()
    assert not (ws / "models/r2talker/checkpoint.pt").exists()
    again = json.loads(talk("--quiet", "train", ws, *args, "--json", check=True).stdout)
    assert again["skipped"]
    status = json.loads(talk("status", ws, "--json", check=True).stdout)
    assert {s["name"]: s["state"] for s in status["stages"]}["train_r2talker"] == "done"
    res = json.loads(talk("--quiet", "eval", ws, "--json", check=True, timeout=600).stdout)
    m = res["metrics"]
    assert res["holdout_frames"] == [180, 199]
    assert res["models"] == ["r2talker"]
    for name in ("r2talker", "retrieval"):
        assert 5 < m[name]["psnr"] < 60 and 0 < m[name]["ssim"] <= 1
    assert m["r2talker"]["fps"] > 0 and m["r2talker"]["fps_512"] > 0 and m["r2talker"]["gflops"] > 0
    assert (ws / "eval/r2talker/samples.png").is_file()


def test_train_names_the_missing_preprocess_stage(ws128, tmp_path):
    ws = _copy(ws128, tmp_path)
    manifest = json.loads((ws / "workspace.json").read_text())
    del manifest["stages"]["matting"]
    (ws / "workspace.json").write_text(json.dumps(manifest))
    proc = talk("train", ws, "--preset", "r2talker-tiny")
    assert proc.returncode == 1
    assert "matting" in proc.stderr and "talk preprocess" in proc.stderr and "Traceback" not in proc.stderr
    assert not (ws / "models").exists()


def test_ray_sampler_oversamples_head_and_mouth(ws128):
    from talkcli.train import RaySampler

    data = load_subject(Workspace(ws128), 64)
    s = RaySampler(data, np.arange(10), seed=0)
    f = 5
    u, v = s.pixels(f, 1000, 0.5, 0.2, 12)
    assert len(u) == len(v) == 1000 and u.min() >= 0 and u.max() < 64 and v.max() < 64
    x0, y0, x1, y1 = data.head_box[f]
    assert ((u[:500] >= x0) & (u[:500] < x1) & (v[:500] >= y0) & (v[:500] < y1)).all()
    cx, cy = data.mouth_center[f]
    mouth = u[500:700], v[500:700]
    assert (np.abs(mouth[0] - cx) <= 7).all() and (np.abs(mouth[1] - cy) <= 7).all()
    pu, pv = s.patch(f, 12)
    assert len(pu) == 144 and len(set(zip(pu.tolist(), pv.tolist()))) == 144


def test_lips_phase_uses_lpips_when_its_weights_are_given(ws128, tmp_path, monkeypatch):
    from test_lpips import write_weights

    write_weights(tmp_path)
    monkeypatch.setenv("TALKCLI_LPIPS", str(tmp_path))
    preset = load_preset("r2talker-tiny", ["train.iterations=12", "train.torso_iterations=0", "train.lips_start=0.5"])
    tr = _trainer(_copy(ws128, tmp_path / "c"), preset)
    assert tr.lpips is not None and tr.in_lips(6) and not tr.in_lips(5)
    calls = []
    real = tr.lpips.forward
    tr.lpips.forward = lambda a, b: calls.append(a.shape) or real(a, b)
    r = tr.step(6)
    assert r["phase"] == "lips" and calls and calls[0][-1] == 64 and np.isfinite(r["loss"])

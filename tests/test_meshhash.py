"""The mesh-anchored avatar (meshhash): anchors, k-NN, warp, training on the fixture, render and
eval beside R2-Talker from one workspace."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from conftest import CLIP, VFR_CLIP, WAV_24BIT, interrupt_at, talk
from talkcli.avatar.config import load_preset
from talkcli.workspace import Workspace

TINY_R2 = ("--preset", "r2talker-tiny", "--set", "train.iterations=100", "--set", "train.torso_iterations=20")
TINY_MH = ("--model", "meshhash", "--preset", "meshhash-tiny", "--set", "train.iterations=200",
           "--set", "train.torso_iterations=20")


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """The 8 s fixture at 128² with both avatars trained (tiny presets)."""
    ws = tmp_path_factory.mktemp("meshhash") / "ws"
    talk("preprocess", CLIP, "-w", ws, "--size", "128", "--json", check=True, timeout=600)
    talk("--quiet", "train", ws, *TINY_R2, "--json", check=True, timeout=600)
    out = json.loads(talk("--quiet", "train", ws, *TINY_MH, "--json", check=True, timeout=600).stdout)
    assert out["avatar"] == "meshhash" and not out["skipped"]
    return ws


def _model_pieces(ws):
    from talkcli.avatar.anchors import build_layout
    from talkcli.avatar.data import head_aabb, load_subject

    data = load_subject(Workspace(ws), 64)
    fit = np.load(ws / "facefit.npz")
    box = head_aabb(data.landmarks)
    layout = build_layout(fit["triangles"], data.mesh, box)
    return data, fit, box, layout


# --------------------------------------------------------------------------- pieces


def test_paper_preset_holds_the_paper_values():
    p = load_preset("meshhash-paper")
    m, t = p.model, p.train
    assert p.avatar == "meshhash"
    assert (m.n_blend, m.hash_levels, m.hash_log2_table, m.hash_features, m.hash_base, m.hash_finest) == \
        (5, 2, 8, 4, 32.0, 64.0)
    assert m.unet_encoder == (8, 16, 32, 64, 128, 256) and m.unet_decoder == (128, 64, 64, 64, 64, 64)
    assert (m.uv_size, m.feature_dim, m.knn_k, m.knn_candidates, m.knn_resolution) == (128, 24, 3, 12, 64)
    assert (m.mlp_layers, m.mlp_hidden, m.pos_bands, m.dir_bands) == (2, 64, 8, 4)
    assert (m.warp_depth, m.warp_width, m.warp_branch_depth, m.warp_bands) == (5, 128, 2, 6)
    assert (t.iterations, t.rays, t.frames_per_batch, t.coarse_samples, t.fine_samples) == (400_000, 2048, 8, 32, 32)
    assert (t.lr, t.lr_warp, t.elastic_weight, t.elastic_weight_late, t.magnitude_weight) == (5e-4, 1e-4, 1e-4, 1e-5, 1e-2)
    assert t.warp_start * t.iterations == 5000 and t.l1_until * t.iterations == 10_000
    assert t.elastic_drop * t.iterations == 150_000
    with pytest.raises(Exception, match="knn"):
        load_preset("meshhash-cpu", ["model.knn=octree"])


def test_anchor_frames_are_rotations_and_local_coordinates_invert(subject):
    from talkcli.avatar.anchors import Anchors, to_local, to_world

    data, _, _, layout = _model_pieces(subject)
    assert 1700 <= layout.n_face <= 1900 and len(layout.proxy) > 100  # ~ the paper's 1782 + the head shell
    anchors = Anchors(layout)
    mesh = torch.from_numpy(data.mesh[:3])
    pos, frames = anchors.positions(mesh), anchors.frames(mesh)
    assert pos.shape == (3, layout.n_anchors, 3) and frames.shape == (3, layout.n_anchors, 3, 3)
    eye = torch.einsum("bvji,bvjk->bvik", frames, frames)
    assert torch.allclose(eye, torch.eye(3).expand_as(eye), atol=1e-5)
    assert torch.allclose(torch.det(frames), torch.ones(1), atol=1e-5)
    # face normals point towards the camera (-z in the head frame) almost everywhere
    assert (frames[0, :468, 2, 2] < 0).float().mean() > 0.95
    g = torch.Generator().manual_seed(0)
    q = pos + 0.01 * torch.randn(pos.shape, generator=g)
    local = to_local(q, pos, frames)
    assert torch.allclose(to_world(local, pos, frames), q, atol=1e-6)
    assert torch.allclose(local.norm(dim=-1), (q - pos).norm(dim=-1), atol=1e-6)  # a rotation keeps lengths
    # the proxy moves rigidly with the head: the same in every frame; the edge midpoints follow the mesh
    assert torch.equal(pos[0, layout.n_face:], pos[2, layout.n_face:])
    e = layout.edges[0]
    assert torch.allclose(pos[1, 478], 0.5 * (mesh[1, e[0]] + mesh[1, e[1]]))


def test_hierarchical_knn_equals_brute_force_where_the_true_neighbours_are_candidates(subject):
    """The paper's approximation on the real anchors: count the samples whose true 3 nearest are
    not all among their cell's 12 candidates, and check every other sample exactly."""
    from talkcli.avatar.anchors import Anchors
    from talkcli.ops.knn import KnnGridSpec, build_knn_grid, cell_index_reference, knn_brute, knn_query

    data, _, box, layout = _model_pieces(subject)
    verts = Anchors(layout).positions(torch.from_numpy(data.mesh[:1]))[0].contiguous()
    g = torch.Generator().manual_seed(1)
    lo, hi = torch.tensor(box[:3]), torch.tensor(box[3:])
    pts = (lo + (hi - lo) * torch.rand(20000, 3, generator=g)).float()
    # and samples near the surface, where renders look
    pts = torch.cat([pts, verts[torch.randint(0, len(verts), (20000,), generator=g)] +
                     0.004 * torch.randn(20000, 3, generator=g)])
    grid = build_knn_grid(verts, KnnGridSpec(resolution=64, candidates=12, k=3))
    idx, d2 = knn_query(pts, verts, grid, 3)
    bidx, bd2 = knn_brute(pts, verts, 3)
    cells = grid.candidates.long()[cell_index_reference(pts, grid)]
    among = (bidx[:, :, None] == cells[:, None, :]).any(-1).all(-1)
    assert torch.equal(idx[among], bidx[among])
    missed = int((~among).sum())
    # a few percent of samples (far from the surface, in sparse cells) miss a true neighbour
    assert missed / len(pts) < 0.1, missed
    print(f"hierarchical k-NN: {missed} of {len(pts)} samples have a true neighbour outside their cell's candidates")


def test_the_warp_field_starts_as_the_identity(subject):
    from talkcli.avatar.meshhash import MeshHashAvatar
    from talkcli.avatar.torso import pose_vector

    data, fit, box, layout = _model_pieces(subject)
    m = load_preset("meshhash-tiny").model
    torch.manual_seed(0)
    model = MeshHashAvatar(m, box, layout, fit["neutral"], fit["uv"], pose_vector(data.rotation, data.translation)
                           .mean(0), 64, data.n_frames)
    mesh = torch.from_numpy(data.mesh[[3, 40]])
    ids = torch.tensor([3, 40])
    x = torch.from_numpy(data.mesh[3, :200]).float() + 0.003
    index = torch.zeros(200, dtype=torch.int64)
    plain = model.head.density(x, model.condition(mesh), index)[0]
    ctx = model.condition(mesh, frame_ids=ids, warp_alpha=2.0)
    warped = model.head.density(x, ctx, index)[0]
    assert len(ctx.warped) == 1 and torch.equal(ctx.warped[0][0], ctx.warped[0][1])
    assert torch.allclose(plain, warped) and (plain > 0).any()


def test_track_landmarks_give_back_the_tracked_meshes(subject):
    from talkcli.avatar.data import subject_landmarks
    from talkcli.motion.mesh import mesh_from_landmarks

    ws = Workspace(subject)
    lmk, ok = subject_landmarks(ws)
    fit = np.load(subject / "facefit.npz")
    mesh = mesh_from_landmarks(ws, lmk[ok])
    err = np.linalg.norm(mesh - fit["landmarks3d"][ok], axis=-1)
    assert err.mean() < 5e-4, err.mean()  # the face model is linear: the 68 points pin every vertex


# --------------------------------------------------------------------------- the fixture, end to end


def test_tiny_meshhash_learns_the_training_frames(subject):
    rows = list(csv.DictReader(open(subject / "models/meshhash/train_log.csv")))
    head = [float(r["psnr"]) for r in rows if r["phase"] == "head"]
    assert head[-1] - head[0] >= 3.0, (head[0], head[-1])
    assert (subject / "models/meshhash/loss.png").is_file()
    assert any((subject / "models/meshhash/val").glob("*.png"))
    status = json.loads(talk("status", subject, "--json", check=True).stdout)
    assert {s["name"]: s["state"] for s in status["stages"]}["train_meshhash"] == "done"


def test_render_with_both_models_from_one_workspace(subject, tmp_path):
    from test_render import probe, wav_seconds

    seconds = wav_seconds(WAV_24BIT)
    for model in ("r2talker", "meshhash"):
        out = tmp_path / f"{model}.mp4"
        res = json.loads(talk("--quiet", "render", subject, "--model", model, "--audio", WAV_24BIT, "-o", out,
                              "--json", check=True, timeout=600).stdout)
        info = probe(out)
        assert res["model"] == model and info["codec"] == "h264"
        assert abs(info["frames"] - round(seconds * 25)) <= 1 and abs(info["audio_s"] - seconds) <= 0.040
    a, b = (tmp_path / "r2talker.mp4").read_bytes(), (tmp_path / "meshhash.mp4").read_bytes()
    assert a != b


def test_meshhash_follows_expressions_and_another_subject(subject, tmp_path):
    from talkcli.drive import make_track

    ws = Workspace(subject)
    other = tmp_path / "other"
    talk("preprocess", VFR_CLIP, "-w", other, "--size", "128", "--json", check=True, timeout=600)
    trk = make_track(ws, source_ws=Workspace(other), pose="still")
    assert trk.mesh is not None and trk.mesh.shape == (trk.n_frames, 478, 3)
    out = tmp_path / "from.mp4"
    res = json.loads(talk("--quiet", "render", subject, "--model", "meshhash", "--from", other, "--pose", "still",
                          "-o", out, "--json", check=True, timeout=600).stdout)
    assert res["frames"] == trk.n_frames and out.is_file()
    # an expression file (landmarks CSV): the mesh is fitted through the subject's face model
    lmk = np.load(subject / "facefit.npz")["landmarks3d"][:12]
    csv_path = tmp_path / "expr.csv"
    with open(csv_path, "w") as fh:
        fh.write(",".join(f"{a}{i}" for i in range(478) for a in "xyz") + "\n")
        for row in lmk.reshape(len(lmk), -1):
            fh.write(",".join(f"{v:.6f}" for v in row) + "\n")
    res = json.loads(talk("--quiet", "render", subject, "--model", "meshhash", "--expressions", csv_path,
                          "-o", tmp_path / "expr.mp4", "--json", check=True, timeout=600).stdout)
    assert res["frames"] == 12


def test_eval_puts_both_models_in_one_table(subject):
    res = json.loads(talk("--quiet", "eval", subject, "--json", check=True, timeout=600).stdout)
    assert res["models"] == ["r2talker", "meshhash"]
    metrics = res["metrics"]
    assert set(metrics) == {"r2talker", "meshhash", "retrieval"}
    for name in ("r2talker", "meshhash"):
        assert metrics[name]["fps"] > 0 and metrics[name]["gflops"] > 0
        assert np.isfinite(metrics[name]["psnr"])
    assert (subject / "eval/r2talker+meshhash/samples.png").is_file()


def test_missing_meshhash_model_says_what_to_run(tmp_path, subject):
    import shutil

    ws = tmp_path / "ws"
    shutil.copytree(subject, ws, symlinks=True)
    shutil.rmtree(ws / "models/meshhash")
    r = talk("render", ws, "--model", "meshhash", "--audio", WAV_24BIT, "-o", tmp_path / "x.mp4")
    assert r.returncode != 0 and "talk train" in r.stderr and "--model meshhash" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x.mp4").exists()


def test_render_picks_the_only_trained_avatar(tmp_path, subject):
    import shutil

    ws = tmp_path / "ws"
    shutil.copytree(subject, ws, symlinks=True)
    shutil.rmtree(ws / "models/r2talker")
    lmk = np.load(subject / "facefit.npz")["landmarks3d"][:5]
    csv_path = tmp_path / "expr.csv"
    np.savetxt(csv_path, lmk.reshape(5, -1), delimiter=",", comments="",
               header=",".join(f"{a}{i}" for i in range(478) for a in "xyz"))
    res = json.loads(talk("--quiet", "render", ws, "--expressions", csv_path, "-o", tmp_path / "only.mp4", "--json",
                          check=True, timeout=600).stdout)
    assert res["model"] == "meshhash" and res["frames"] == 5


def test_merged_tables_render_the_same_field_as_separate_ones(subject):
    """Rendering merges each anchor's M tables once per frame (Eq. 1); training reads the M tables
    and blends the lookups. Hash interpolation is linear in the table entries: same field."""
    from talkcli.train import load_model, model_file

    model, _, _ = load_model(subject / model_file("meshhash"))
    fit = np.load(subject / "facefit.npz")
    mesh = torch.from_numpy(fit["landmarks3d"][[150, 185]]).float()
    g = torch.Generator().manual_seed(2)
    x = mesh[1, torch.randint(0, 478, (3000,), generator=g)] + 0.01 * torch.randn(3000, 3, generator=g)
    d = torch.nn.functional.normalize(torch.randn(3000, 3, generator=g), dim=-1)
    index = torch.randint(0, 2, (3000,), generator=g)
    ctx = model.condition(mesh)
    assert ctx.merged is None
    sigma, rgb = model.head(x, d, ctx, index)
    with torch.no_grad():
        ctx = model.condition(mesh)
        assert ctx.merged is not None
        sigma_m, rgb_m = model.head(x, d, ctx, index)
    assert (sigma > 0).sum() > 1000
    assert torch.allclose(sigma.detach(), sigma_m, rtol=1e-4, atol=1e-4)
    assert torch.allclose(rgb.detach(), rgb_m, atol=1e-5)


def test_interrupted_meshhash_training_resumes_where_it_stopped(subject, tmp_path):
    """Ctrl-C writes a checkpoint; a new trainer resumes at the same iteration with the same
    weights, Adam moments and random streams (the warp field is on from iteration 10 here)."""
    import shutil

    from talkcli.avatar.data import load_subject
    from talkcli.train import UPSTREAM
    from talkcli.train_meshhash import MeshHashTrainer

    ws_path = tmp_path / "ws"
    shutil.copytree(subject, ws_path, symlinks=True, ignore=shutil.ignore_patterns("models", "eval"))
    preset = load_preset("meshhash-tiny", ["train.iterations=30", "train.torso_iterations=5",
                                           "train.warp_start=0.3", "train.checkpoint_every=1000",
                                           "train.val_every=100000", "train.occupancy_warmup=8"])

    def trainer():
        ws = Workspace(ws_path)
        data = load_subject(ws, preset.train.size)
        train_idx, hold_idx = data.split(preset.train.holdout_fraction)
        return MeshHashTrainer(ws, preset, data, train_idx, hold_idx,
                               {n: ws.record(n)["output_key"] for n in UPSTREAM})

    tr = trainer()
    interrupt_at(tr, 17)
    assert (ws_path / "models/meshhash/checkpoint.pt").is_file()
    saved = {k: v.clone() for k, v in tr.model.state_dict().items()}
    saved_steps = {k: int(s["step"]) for k, s in tr.head_opt.state_dict()["state"].items()}
    fresh = trainer()
    assert fresh.try_resume() and fresh.state.iteration == 17
    for k, v in fresh.model.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    steps = {k: int(s["step"]) for k, s in fresh.head_opt.state_dict()["state"].items()}
    assert steps == saved_steps and max(steps.values()) == 17
    # the warp field (on from iteration 9) has its own, shorter Adam history
    assert fresh.warp_alpha(17) is not None and min(steps.values()) < 17
    summary = fresh.run()
    assert summary["iterations"] == 35

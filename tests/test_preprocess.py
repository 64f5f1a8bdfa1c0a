"""``talk preprocess`` end to end on the real fixture videos."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from talkcli.preprocess.pipeline import CODE_VERSIONS
from conftest import CLIP, VFR_CLIP, talk
from talkcli import workspace as wsmod
from talkcli.config import PreprocessConfig
from talkcli.media.audio import read_wav
from talkcli.preprocess import pipeline
from talkcli.workspace import Workspace, run_stage

SIZE = "128"  # small frames keep the suite fast; the pipeline is the same at 512


def _snapshot(root: Path) -> dict:
    """Every file with its content hash and mtime."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def clip_ws(tmp_path_factory):
    """The 512 clip preprocessed once; tests that change it work on copies."""
    root = tmp_path_factory.mktemp("clip")
    video = root / "talking-head.mp4"
    shutil.copy2(CLIP, video)
    ws = root / "ws"
    proc = talk("preprocess", video, "-w", ws, "--size", SIZE, "--json", check=True)
    return video, ws, json.loads(proc.stdout)


def test_clip_frames_audio_and_features(clip_ws):
    video, ws, summary = clip_ws
    assert abs(summary["frames"] - 200) <= 1
    n = summary["frames"]
    frames = sorted((ws / "frames").glob("*.png"))
    assert len(frames) == n
    img = cv2.imread(str(frames[0]))
    assert img.shape == (128, 128, 3)
    meta = json.loads((ws / "frames" / "frames.json").read_text())
    assert meta["n_frames"] == n and meta["fps"] == 25
    # the face fills this clip, so the crop is the whole 512x512 frame
    assert summary["crop"] == [0, 0, 512, 512]
    assert summary["face_fraction"] >= 0.98
    # audio: 16 kHz mono, as long as the video to within a frame
    samples, sr = read_wav(ws / "audio" / "audio.wav")
    assert sr == 16000
    assert abs(samples.size / sr - n / 25) <= 1 / 25
    assert np.abs(samples).max() > 0.05
    # features: 4 log-mel frames per video frame, following the loudness of the audio
    feats = np.load(ws / "audio" / "features.npz")
    assert feats["features"].shape == (n, 4, 80)
    assert str(feats["kind"]) == "logmel"
    energy = np.log10((samples[: n * 640].reshape(n, 640) ** 2).mean(axis=1) + 1e-10)
    loudness = feats["features"].mean(axis=(1, 2))
    assert np.corrcoef(energy, loudness)[0, 1] > 0.8


def test_status_json_all_done(clip_ws):
    _, ws, _ = clip_ws
    proc = talk("status", ws, "--json", check=True)
    states = {s["name"]: s["state"] for s in json.loads(proc.stdout)["stages"]}
    assert states == {"probe": "done", "detect": "done", "frames": "done", "landmarks": "done", "matting": "done",
                      "facefit": "done", "audio": "done", "audio_features": "done",
                      # not trained yet: the avatar and the motion model are missing
                      "train_r2talker": "missing", "train_meshhash": "missing", "train_motion": "missing"}


def test_second_run_skips_quickly_and_changes_nothing(clip_ws):
    video, ws, _ = clip_ws
    before = _snapshot(ws)
    proc = talk("preprocess", video, "-w", ws, "--size", SIZE, "--json", check=True)
    summary = json.loads(proc.stdout)
    assert all(s["skipped"] for s in summary["stages"].values())
    assert summary["seconds"] < 1.0
    assert _snapshot(ws) == before


def _copy_ws(clip_ws, tmp_path) -> tuple[Path, Path]:
    video, ws, _ = clip_ws
    new_video = tmp_path / video.name
    shutil.copy2(video, new_video)  # keeps the mtime, so the fingerprint is the same
    new_ws = tmp_path / "ws"
    shutil.copytree(ws, new_ws)
    manifest = json.loads((new_ws / "workspace.json").read_text())
    manifest["source"]["path"] = str(new_video.resolve())
    (new_ws / "workspace.json").write_text(json.dumps(manifest))
    return new_video, new_ws


def test_touching_the_input_redoes_nothing_and_new_content_redoes_everything(clip_ws, tmp_path):
    video, ws = _copy_ws(clip_ws, tmp_path)
    pre = set(CODE_VERSIONS)  # the preprocess stages (train stages are missing: nothing trained)

    def states():
        return {s["name"]: s["state"] for s in json.loads(talk("status", ws, "--json").stdout)["stages"]
                if s["name"] in pre}

    assert set(states().values()) == {"done"}
    st = video.stat()
    os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))  # touched (or copied): same bytes
    assert set(states().values()) == {"done"}
    summary = json.loads(talk("preprocess", video, "-w", ws, "--size", SIZE, "--json", check=True).stdout)
    assert all(s["skipped"] for s in summary["stages"].values())
    # the same frames and sound in other bytes (a remux with a title): the source changed
    from talkcli.media.ffmpeg import ffmpeg_exe

    remux = tmp_path / "remux.mp4"
    subprocess.run([ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-i", str(video), "-c", "copy",
                    "-metadata", "title=another take", str(remux)], check=True, timeout=120)
    os.replace(remux, video)
    assert set(states().values()) == {"stale"}
    summary = json.loads(talk("preprocess", video, "-w", ws, "--size", SIZE, "--json", check=True).stdout)
    assert not any(s["skipped"] for s in summary["stages"].values())


def test_changing_the_size_redoes_frames_and_marks_downstream_stale(clip_ws, tmp_path, monkeypatch):
    video, root = _copy_ws(clip_ws, tmp_path)
    ws = Workspace(root)
    # A stage made from the frames, as the landmark tracker will be.
    monkeypatch.setattr(wsmod, "STAGES", {**wsmod.STAGES, "consumer": ("frames",)})
    with ws.locked("test"):
        run_stage(ws, "consumer", code_version=1, config={}, inputs={"frames": ws.record("frames")["output_key"]},
                  outputs=[], fn=lambda: {})
    assert {s.name: s.state for s in ws.status()}["consumer"] == "done"
    with ws.locked("test"):
        summary = pipeline.run(ws, video, PreprocessConfig(size=96))
    ran = {n for n, s in summary["stages"].items() if not s["skipped"]}
    assert ran == {"frames", "landmarks", "matting", "facefit"}  # not detect, audio or features
    assert cv2.imread(str(root / "frames" / "000000.png")).shape == (96, 96, 3)
    status = {s.name: (s.state, s.reason) for s in ws.status()}
    assert status["frames"] == ("done", "")
    assert status["consumer"] == ("stale", "upstream frames was redone")


def test_vfr_clip_constant_25fps_with_audio_in_sync(tmp_path):
    ws = tmp_path / "ws"
    summary = json.loads(talk("preprocess", VFR_CLIP, "-w", ws, "--size", SIZE, "--json", check=True).stdout)
    n = summary["frames"]
    assert n == 153  # 6.133 s at 25 fps
    assert len(list((ws / "frames").glob("*.png"))) == n
    samples, sr = read_wav(ws / "audio" / "audio.wav")
    assert samples.size == n * sr // 25
    probe = json.loads((ws / "source" / "probe.json").read_text())
    assert probe["media"]["video"]["vfr"] is True
    # head and shoulders framing: a square crop inside the 700x700 frame around the face
    x, y, w, h = summary["crop"]
    assert w == h and 400 <= w < 700 and x >= 0 and y >= 0 and x + w <= 700 and y + h <= 700
    faces = np.load(ws / "detect" / "faces.npz")
    fx, fy, fw, fh = np.nanmedian(faces["boxes"], axis=0)
    assert x < fx and fx + fw < x + w and y < fy and fy + fh < y + h


def test_killed_midway_reruns_cleanly(tmp_path):
    video = tmp_path / "clip.mp4"
    shutil.copy2(CLIP, video)
    ws = tmp_path / "ws"
    proc = subprocess.Popen([sys.executable, "-m", "talkcli.cli", "--quiet", "preprocess", str(video), "-w",
                             str(ws), "--size", SIZE], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    staged = []
    while time.time() < deadline and proc.poll() is None:
        staged = list((ws / ".tmp").glob("frames-*/*.png")) if (ws / ".tmp").exists() else []
        if len(staged) >= 20:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"preprocess ended before it could be killed: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    states = {s.name: s.state for s in Workspace(ws).status()}
    assert states["probe"] == "done" and states["detect"] == "done"
    assert states["frames"] == "missing"
    assert not (ws / "frames").exists()
    summary = json.loads(talk("preprocess", video, "-w", ws, "--size", SIZE, "--json", check=True).stdout)
    assert summary["stages"]["probe"]["skipped"] and summary["stages"]["detect"]["skipped"]
    assert not summary["stages"]["frames"]["skipped"]
    assert len(list((ws / "frames").glob("*.png"))) == 200
    assert not (ws / ".tmp").exists() or not any((ws / ".tmp").iterdir())


def test_second_run_waits_for_nobody_and_names_the_holder(clip_ws, tmp_path):
    video, ws = _copy_ws(clip_ws, tmp_path)
    code = (f"import time\nfrom talkcli.workspace import Workspace\n"
            f"with Workspace({str(ws)!r}).locked('talk preprocess other.mp4'):\n"
            f"    print('locked', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = talk("preprocess", video, "-w", ws, "--size", SIZE)
        assert proc.returncode == 3
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and "talk preprocess other.mp4" in lines[0]
    finally:
        holder.kill()
        holder.wait()
    assert talk("preprocess", video, "-w", ws, "--size", SIZE).returncode == 0


def test_default_workspace_is_named_after_the_video(tmp_path):
    video = tmp_path / "subject-one.mp4"
    shutil.copy2(CLIP, video)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = subprocess.run([sys.executable, "-m", "talkcli.cli", "--quiet", "preprocess", str(video), "--crop", "full",
                           "--size", "64", "--frame-format", "jpg"], cwd=run_dir, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(list((run_dir / "subject-one" / "frames").glob("*.jpg"))) == 200


def test_info_reports_versions_device_and_models(tmp_path):
    env = {**os.environ, "TALKCLI_MODELS": str(tmp_path / "models")}
    (tmp_path / "models" / "flame").mkdir(parents=True)
    (tmp_path / "models" / "flame" / "generic_model.pkl").write_bytes(b"x")
    proc = subprocess.run([sys.executable, "-m", "talkcli.cli", "info", "--json"], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["packages"]["torch"].startswith("2.")
    assert data["device"]["cpu_count"] >= 1 and "cuda" in data["device"]
    assert data["native_kernels"]["backend"] in ("auto", "native", "reference")
    flame = data["optional_models"]["flame"]
    assert not flame["configured"] and "mediapipe_landmark_embedding.npz" in flame["detail"]
    assert data["optional_models"]["lpips"]["detail"].startswith("not configured")
    assert data["ffmpeg"]["version"] != "unavailable"

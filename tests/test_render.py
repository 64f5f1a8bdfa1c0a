"""talk drive / talk render on the real fixture: sync, sources, poses, errors."""

from __future__ import annotations

import json
import shutil
import wave

import av
import numpy as np
import pytest

from conftest import CLIP, VFR_CLIP, WAV_16K, WAV_24BIT, talk
from talkcli.motion.pose import add_blinks, ping_pong, poses

TINY = ("--preset", "r2talker-tiny", "--set", "train.iterations=150", "--set", "train.torso_iterations=30")


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """The 8 s fixture at 128², trained with the tiny preset (avatar and motion model)."""
    ws = tmp_path_factory.mktemp("render") / "ws"
    talk("preprocess", CLIP, "-w", ws, "--size", "128", "--json", check=True, timeout=600)
    out = json.loads(talk("--quiet", "train", ws, *TINY, "--json", check=True, timeout=600).stdout)
    assert set(out["motion"]) >= {"audio2motion", "mean_expression", "audio_retrieval"}
    return ws


def probe(path):
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        a = c.streams.audio[0] if c.streams.audio else None
        frames = sum(1 for _ in c.decode(video=0))
        vd = float(v.duration * v.time_base) if v.duration else None
        ad = float(a.duration * a.time_base) if a is not None and a.duration else None
        return {"codec": v.codec_context.name, "frames": frames, "fps": float(v.average_rate), "video_s": vd,
                "audio_s": ad, "size": (v.codec_context.width, v.codec_context.height)}


def wav_seconds(path):
    with av.open(str(path)) as c:
        s = c.streams.audio[0]
        return float(s.duration * s.time_base)


@pytest.mark.parametrize("wav", [WAV_16K, WAV_24BIT], ids=["16k-stereo", "48k-24bit"])
def test_render_audio_is_h264_with_sound_in_sync(subject, tmp_path, wav):
    out = tmp_path / "out.mp4"
    res = json.loads(talk("--quiet", "render", subject, "--audio", wav, "-o", out, "--json", check=True,
                          timeout=600).stdout)
    seconds = wav_seconds(wav)
    info = probe(out)
    assert info["codec"] == "h264" and info["fps"] == pytest.approx(25.0)
    assert abs(info["frames"] - round(seconds * 25)) <= 1, (info, seconds)
    assert info["audio_s"] is not None and abs(info["audio_s"] - seconds) <= 0.040, (info, seconds)
    assert res["frames"] == info["frames"] and res["has_audio"] and res["fps_achieved"] > 0
    with av.open(str(out)) as c:  # the mouth moves: frames differ in the mouth region
        imgs = [f.to_ndarray(format="rgb24").astype(np.float32) for f in c.decode(video=0)]
    h = imgs[0].shape[0]
    lower = np.stack([im[int(0.55 * h):int(0.8 * h), int(0.35 * h):int(0.65 * h)] for im in imgs[::5]])
    assert lower.std(axis=0).mean() > 2.0


def test_expressions_csv_and_other_workspace(subject, tmp_path):
    fit = np.load(subject / "facefit.npz")
    idx = np.load(subject / "landmarks.npz")["ibug68_index"]
    lmk = fit["landmarks3d"][:50, idx].reshape(50, -1)
    csv = tmp_path / "expr.csv"
    header = ",".join(f"{c}{i}" for i in range(68) for c in "xyz")
    np.savetxt(csv, lmk, delimiter=",", header=header, comments="")
    out = tmp_path / "expr.mp4"
    res = json.loads(talk("--quiet", "render", subject, "--expressions", csv, "--pose", "still", "-o", out,
                          "--json", check=True, timeout=600).stdout)
    assert res["frames"] == 50 and not res["has_audio"] and probe(out)["frames"] == 50
    # coefficients of the subject's own face model, as NPZ
    npz = tmp_path / "coef.npz"
    np.savez(npz, expression=fit["expression"][:30])
    track = tmp_path / "coef-track.npz"
    talk("--quiet", "drive", subject, "--expressions", npz, "-o", track, check=True)
    assert np.load(track)["landmarks"].shape == (30, 68, 3)
    # cross-reenactment from another subject's workspace (the VFR clip), with its sound
    other = tmp_path / "other"
    talk("preprocess", VFR_CLIP, "-w", other, "--size", "128", check=True, timeout=600)
    out2 = tmp_path / "from.mp4"
    res = json.loads(talk("--quiet", "render", subject, "--from", other, "--pose", "source", "-o", out2, "--json",
                          check=True, timeout=600).stdout)
    info = probe(out2)
    assert res["has_audio"] and abs(info["frames"] - res["frames"]) <= 1
    assert abs(info["audio_s"] - wav_seconds(other / "audio/audio.wav")) <= 0.040


def test_background_source_pastes_into_the_subject_frames(subject, tmp_path):
    out = tmp_path / "dub.mp4"
    short = tmp_path / "short.wav"
    with wave.open(str(short), "wb") as w:  # 1.2 s of the 16 kHz fixture
        with wave.open(str(subject / "audio/audio.wav"), "rb") as r:
            w.setparams(r.getparams())
            w.writeframes(r.readframes(int(1.2 * 16000)))
    talk("--quiet", "render", subject, "--audio", short, "--background", "source", "-o", out, check=True,
         timeout=600)
    with av.open(str(out)) as c:
        first = next(c.decode(video=0)).to_ndarray(format="rgb24").astype(np.float32)
    import cv2

    real = cv2.cvtColor(cv2.imread(str(subject / "frames/000000.png")), cv2.COLOR_BGR2RGB)
    s = first.shape[0]
    real = cv2.resize(real, (s, s), interpolation=cv2.INTER_AREA).astype(np.float32)
    # outside the head the real frame shows through (up to H.264 loss); the corners are background
    c = s // 5
    assert np.abs(first[:c, :c] - real[:c, :c]).mean() < 10.0


def test_errors_leave_no_partial_mp4(subject, tmp_path):
    untrained = tmp_path / "untrained"
    shutil.copytree(subject, untrained, ignore=shutil.ignore_patterns("models"))
    out = tmp_path / "x.mp4"
    proc = talk("render", untrained, "--audio", WAV_16K, "-o", out)
    assert proc.returncode == 1 and "talk train" in proc.stderr and "Traceback" not in proc.stderr
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio\n" * 50)
    proc = talk("render", subject, "--audio", not_audio, "-o", out)
    assert proc.returncode == 1 and "notes.wav" in proc.stderr and "Traceback" not in proc.stderr
    empty = tmp_path / "empty.wav"
    with wave.open(str(empty), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    proc = talk("render", subject, "--audio", empty, "-o", out)
    assert proc.returncode == 1 and "empty" in proc.stderr and "Traceback" not in proc.stderr
    proc = talk("render", subject, "-o", out)
    assert proc.returncode == 2 and "--audio" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*tmp*"))


def test_pose_modes_and_blinks():
    idx = ping_pong(5, 12)
    assert idx.tolist() == [0, 1, 2, 3, 4, 3, 2, 1, 0, 1, 2, 3]
    assert np.abs(np.diff(idx)).max() == 1  # never a jump
    rot = np.stack([np.eye(3, dtype=np.float32)] * 4)
    tr = np.arange(12, dtype=np.float32).reshape(4, 3)
    r, t = poses("still", 7, rot, tr, np.arange(4))
    assert np.allclose(t, tr.mean(0)) and np.allclose(r, np.eye(3))
    r, t = poses("loop", 7, rot, tr, np.array([1, 3]))
    assert t[:, 0].tolist() == [3, 9, 3, 9, 3, 9, 3]
    offsets = np.zeros((250, 68, 3), np.float32)
    shape = np.zeros((68, 3), np.float32)
    shape[37:42, 1] = 0.05
    out = add_blinks(offsets, shape, 25.0, seed=1)
    moving = np.abs(out[:, 37, 1]) > 1e-6
    assert moving.any() and not np.abs(out[:, :36]).any()
    assert np.array_equal(add_blinks(offsets, None, 25.0), offsets)

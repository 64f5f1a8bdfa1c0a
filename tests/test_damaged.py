"""Damaged, truncated and hostile files: ``talk`` fails with one line that names the file and what to
rerun, and never runs code from a pickle.

One workspace (conftest.tiny_subject): 3 s of the fixture at 64², trained with the tiny preset
(avatar and motion model). Tests that damage a file do it in a copy. Where the workspace would
notice the damage by itself (its records hold every output's size and hash, so a changed file makes
its stage stale), ``consistent()`` rewrites the record so that the damaged file is what the code
that reads it sees.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CLIP, WAV_16K, WAV_24BIT
from talkcli.errors import InputError
from talkcli.media.ffmpeg import ffmpeg_exe

TINY = ("--preset", "r2talker-tiny", "--set", "train.iterations=4", "--set", "train.torso_iterations=2")


# --------------------------------------------------------------------------- helpers


def talk(*args, cwd: Path, quiet: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "talkcli.cli", *(["--quiet"] if quiet else []), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def assert_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 1) -> str:
    """Exit ``code``; stderr is one ``error:`` line (no traceback, no internal error) with every needle."""
    where = f"\nstdout: {proc.stdout!r}\nstderr: {proc.stderr!r}"
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}{where}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, where
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in the error line{where}"
    return lines[0]


def copy_ws(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def consistent(ws: Path, rel: str) -> None:
    """Record ``rel`` as it is now in every stage that lists it: the damage goes unnoticed by
    the workspace checks, so the reader of the file meets it."""
    from talkcli.workspace import output_stats

    manifest = ws / "workspace.json"
    data = json.loads(manifest.read_text())
    found = False
    for rec in data["stages"].values():
        if rel in rec.get("outputs", {}):
            rec["outputs"][rel] = output_stats(ws, rel)
            found = True
    assert found, f"no stage records {rel}"
    manifest.write_text(json.dumps(data, indent=2))


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def write_wav(path: Path, samples: int, declared: int | None = None) -> Path:
    """16 kHz mono 16-bit with ``samples`` of noise; ``declared`` rewrites the data chunk's size
    (in samples) to claim more than the file holds."""
    rng = np.random.default_rng(0)
    with wave.open(str(path), "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(2)
        wf.setframerate(16000)
        wf.writeframes((rng.normal(0, 3000, samples)).astype("<i2").tobytes())
    if declared is not None:
        raw = bytearray(path.read_bytes())
        raw[40:44] = (2 * declared).to_bytes(4, "little")  # the data chunk of a plain 44-byte header
        raw[4:8] = (36 + 2 * declared).to_bytes(4, "little")
        path.write_bytes(bytes(raw))
    return path


class RunsCode:
    """Unpickling this runs ``touch MARKER``: what a hostile model file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile(path: Path, marker: Path, how: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "torch.save":
        torch.save({"state": RunsCode(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(RunsCode(marker), protocol=2))


# --------------------------------------------------------------------------- the workspace


@pytest.fixture(scope="module")
def subject(tiny_subject) -> Path:
    """3 s of the fixture at 64², trained for a few iterations (conftest.tiny_subject)."""
    ws = tiny_subject["ws"]
    assert (ws / "models/r2talker/model.pt").is_file() and (ws / "models/motion/motion.pt").is_file()
    return ws


# --------------------------------------------------------------------------- 1. bad --audio files


def test_short_pieces_of_speech_are_silence_to_the_phone_recogniser():
    """pocketsphinx's seg() is None, not empty, for a piece shorter than its analysis window: a
    25 ms file, or the last few ms of audio a little longer than the 30 s utterances."""
    from talkcli.motion.phonetic import UTTERANCE_S, phone_track

    for n in (10, 400, int(UTTERANCE_S * 16000) + 100):
        track = phone_track(np.zeros(n, np.float32))
        assert track.shape == (int(np.ceil(n / 160)),)
        assert not track[int(UTTERANCE_S * 100):].any()  # the short (last) piece: silence


def test_a_complete_wav_of_one_frame_gives_viseme_features(tmp_path):
    from talkcli.motion.sources import audio_features

    feats, seconds = audio_features(write_wav(tmp_path / "a.wav", 400), 25.0, visemes=True)
    assert feats["mel"].shape[0] == feats["visemes"].shape[0] == 1 and seconds == pytest.approx(0.025)


def test_a_truncated_wav_is_refused_by_load_audio(tmp_path):
    from talkcli.media.audio import load_audio

    with pytest.raises(InputError, match=r"cut\.wav is truncated: its header declares 1\.00 s"):
        load_audio(write_wav(tmp_path / "cut.wav", 400, declared=16000))
    for complete in (WAV_16K, WAV_24BIT):  # complete files are not (the 24-bit one: a JUNK chunk first)
        assert load_audio(complete).size > 5 * 16000


@pytest.mark.parametrize("kind, needle", [
    ("zero-bytes", "is empty"),
    ("header-only", "is empty"),
    ("header-then-nothing", "is truncated"),  # with some data after it: test_truncated_audio_for_render
    ("text", "not a media file"),
    ("directory", "a directory"),
])
def test_bad_audio_for_drive(subject, tmp_path, kind, needle):
    path = tmp_path / "speech.wav"
    if kind == "zero-bytes":
        path.write_bytes(b"")
    elif kind == "header-only":
        write_wav(path, 0)
    elif kind == "header-then-nothing":
        write_wav(path, 0, declared=16000)
    elif kind == "text":
        path.write_text("not a sound\n" * 20)
    else:
        path.mkdir()
    proc = talk("drive", subject, "--audio", path, "-o", tmp_path / "t.npz", cwd=tmp_path)
    assert_error(proc, "speech.wav", needle)
    assert not (tmp_path / "t.npz").exists()


def test_truncated_audio_for_render(subject, tmp_path):
    wav = write_wav(tmp_path / "cut.wav", 400, declared=16000)
    proc = talk("render", subject, "--audio", wav, "-o", tmp_path / "out.mp4", cwd=tmp_path)
    assert_error(proc, "cut.wav", "truncated")
    assert not (tmp_path / "out.mp4").exists()


# --------------------------------------------------------------------------- 2. pickles never run code


@pytest.mark.parametrize("how, command", [("torch.save", "render"), ("pickle", "eval")])
def test_a_hostile_model_is_refused(subject, tmp_path, how, command):
    ws = copy_ws(subject, tmp_path / "ws")
    marker = tmp_path / "MARKER"
    hostile(ws / "models/r2talker/model.pt", marker, how)
    args = ("--audio", WAV_16K, "-o", tmp_path / "out.mp4") if command == "render" else ()
    proc = talk(command, ws, *args, cwd=tmp_path)
    assert_error(proc, "models/r2talker/model.pt", f"talk train {ws} --force")
    assert not marker.exists()


def test_a_hostile_motion_model_is_refused(subject, tmp_path):
    ws = copy_ws(subject, tmp_path / "ws")
    marker = tmp_path / "MARKER"
    hostile(ws / "models/motion/motion.pt", marker, "torch.save")
    proc = talk("drive", ws, "--audio", WAV_16K, cwd=tmp_path)
    assert_error(proc, "models/motion/motion.pt", "would run", f"talk train {ws} --force")
    assert not marker.exists()


def test_a_hostile_checkpoint_is_not_resumed(subject, tmp_path):
    """``talk train`` warns and trains from the start (another iteration count: the stage reruns)."""
    ws = copy_ws(subject, tmp_path / "ws")
    marker = tmp_path / "MARKER"
    hostile(ws / "models/r2talker/checkpoint.pt", marker, "torch.save")
    proc = talk("train", ws, *TINY[:-2], "--set", "train.torso_iterations=3", "--json", cwd=tmp_path, quiet=False)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    assert "checkpoint.pt is damaged or not a talkcli checkpoint; training from the start" in proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["resumed"] is False and summary["iterations"] == 7
    assert not (ws / "models/r2talker/checkpoint.pt").exists()


def test_a_hostile_flame_pickle_is_refused_by_preprocess(subject, tmp_path):
    """The restricted unpickler (tests/test_flame.py) through the CLI: one line, nothing run, and
    the stages before the face fit are kept."""
    ws = copy_ws(subject, tmp_path / "ws")
    marker = tmp_path / "MARKER"
    flame = tmp_path / "flame"
    flame.mkdir()
    (flame / "generic_model.pkl").write_bytes(pickle.dumps(RunsCode(marker), protocol=2))
    (flame / "mediapipe_landmark_embedding.npz").write_bytes(b"")  # never reached
    video = json.loads((ws / "workspace.json").read_text())["source"]["path"]
    proc = talk("preprocess", video, "-w", ws, "--size", "64", "--flame", flame / "generic_model.pkl", cwd=tmp_path)
    assert_error(proc, "generic_model.pkl", "refuses to load")
    assert not marker.exists()


def test_model_files_hold_no_numpy_objects(subject, tmp_path):
    """What is written now loads with torch's default allowlist: tensors and Python values only."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    from talkcli.avatar.config import load_preset
    from talkcli.train import read_payload, save_model

    for rel in ("models/r2talker/model.pt", "models/motion/motion.pt"):
        assert get_unsafe_globals_in_checkpoint(subject / rel) == [], rel

    class Stub:  # what save_model reads of a model; the meshhash avatar's extra holds arrays
        aabb, size = (0.0,) * 6, 64

        def state_dict(self):
            return {"w": torch.zeros(2)}

    extra = {"init": {"triangles": np.zeros((4, 3), np.int64), "n_frames": np.int64(5)}, "focal": np.float64(2.5)}
    path = tmp_path / "model.pt"
    save_model(path, Stub(), load_preset("meshhash-tiny"), extra)
    assert get_unsafe_globals_in_checkpoint(path) == []
    payload = read_payload(path)
    assert payload["init"]["n_frames"] == 5 and payload["focal"] == 2.5
    assert torch.equal(payload["init"]["triangles"], torch.zeros((4, 3), dtype=torch.int64))


def test_files_of_earlier_versions_with_numpy_arrays_still_load(subject, tmp_path):
    """Earlier versions wrote numpy arrays and scalars into motion.pt (and the meshhash avatar's init)."""
    from talkcli.artifacts import load_torch
    from talkcli.motion import stage

    new = stage.load(subject / "models/motion/motion.pt")
    old_path = tmp_path / "old" / "motion.pt"
    old_path.parent.mkdir()
    torch.save({**new.to_dict(), "scale": np.float64(0.1)}, old_path)  # numpy, as those versions wrote
    old = stage.load(old_path)
    feats = {k: np.random.default_rng(0).random((12, 4, 80 if k == "mel" else 12), dtype=np.float32)
             for k in new.sources}
    np.testing.assert_array_equal(old.predict_offsets(feats), new.predict_offsets(feats))
    values = {"f4": np.arange(3, dtype=np.float32), "i8": np.arange(3), "b": np.ones(2, bool), "s": np.float64(1.5)}
    torch.save(values, tmp_path / "np.pt")
    back = load_torch(tmp_path / "np.pt", "rerun")
    assert all(np.array_equal(back[k], v) and back[k].dtype == v.dtype for k, v in values.items())


# --------------------------------------------------------------------------- 3. damaged artifacts


@pytest.mark.parametrize("damage, command", [("half", "render"), ("empty", "eval")])
def test_a_damaged_avatar(subject, tmp_path, damage, command):
    ws = copy_ws(subject, tmp_path / "ws")
    truncate(ws / "models/r2talker/model.pt", 0.5 if damage == "half" else 0.0)
    args = ("--audio", WAV_16K, "-o", tmp_path / "out.mp4") if command == "render" else ()
    proc = talk(command, ws, *args, cwd=tmp_path)
    assert_error(proc, "models/r2talker/model.pt", "damaged", f"talk train {ws} --force")


def test_a_truncated_motion_model(subject, tmp_path):
    ws = copy_ws(subject, tmp_path / "ws")
    truncate(ws / "models/motion/motion.pt")
    proc = talk("drive", ws, "--audio", WAV_16K, cwd=tmp_path)
    assert_error(proc, "models/motion/motion.pt", "damaged", f"talk train {ws} --force")


def test_a_damaged_preprocess_output_is_a_stale_stage(subject, tmp_path):
    ws = copy_ws(subject, tmp_path / "ws")
    truncate(ws / "facefit.npz")
    assert_error(talk("drive", ws, "--audio", WAV_16K, cwd=tmp_path), "facefit", "talk preprocess")


@pytest.mark.parametrize("command", ["train", "render", "drive", "train-motion", "eval"])
def test_a_truncated_face_fit_that_its_record_matches(subject, tmp_path, command):
    ws = copy_ws(subject, tmp_path / "ws")
    truncate(ws / "facefit.npz")
    consistent(ws, "facefit.npz")
    args = {"train": (ws, *TINY, "--force"), "render": (ws, "--audio", WAV_16K, "-o", tmp_path / "o.mp4"),
            "drive": (ws, "--audio", WAV_16K), "train-motion": (ws, "-o", tmp_path / "m.pt"), "eval": (ws,)}[command]
    proc = talk(command, *args, cwd=tmp_path)
    assert_error(proc, f"{ws}/facefit.npz is damaged", f"talk preprocess {subject.parent / 'clip.mp4'} -w {ws} --force")


def test_garbage_landmarks_that_their_record_matches(subject, tmp_path):
    ws = copy_ws(subject, tmp_path / "ws")
    path = ws / "landmarks.npz"
    path.write_bytes(os.urandom(path.stat().st_size))
    consistent(ws, "landmarks.npz")
    assert_error(talk("drive", ws, "--audio", WAV_16K, cwd=tmp_path), "landmarks.npz is damaged", "--force")


def test_an_npz_damaged_inside_fails_when_read(tmp_path):
    """The central directory is intact, a member's bytes are not: the error comes on reading."""
    from talkcli.artifacts import Npz

    path = tmp_path / "facefit.npz"
    np.savez(path, rotation=np.zeros((50, 3, 3), np.float32), translation=np.ones((50, 3), np.float32))
    raw = bytearray(path.read_bytes())
    raw[200:400] = os.urandom(200)  # inside the first member's data
    path.write_bytes(bytes(raw))
    npz = Npz(path, "talk preprocess VIDEO -w WS --force")
    assert "rotation" in npz and "expression" not in npz
    with pytest.raises(InputError, match=r"facefit\.npz is damaged \(\w+\); run `talk preprocess VIDEO"):
        npz["rotation"]
    with pytest.raises(InputError, match=r"damaged \(no array 'expression'\)"):
        npz["expression"]

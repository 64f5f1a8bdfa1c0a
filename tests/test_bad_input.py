"""Bad input, bad options and hostile storage: the ``talk`` command fails cleanly.

Every case runs the real CLI (``python -m talkcli.cli``) as a subprocess, except the in-process
disk-full fallback (two tests), which needs a monkeypatch. For every failure we check:

* the documented exit code (1 bad input, 2 usage / not available, 4 storage);
* with ``--quiet`` stderr is exactly one non-empty line starting with ``error:``, and no traceback;
* nothing half-written: no ``*.tmp*`` files, no staging directories, no write-test or lock file;
* no stage record claims outputs that are not there: every stage is ``done`` or ``missing`` (never
  ``missing`` with a record, i.e. "output changed or removed"), and the stages finished before the
  failure are still ``done``.

Inputs are generated in tmp_path from the shared fixture media with the ffmpeg talkcli uses.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from talkcli.media.ffmpeg import ffmpeg_exe
from talkcli.workspace import Workspace

from conftest import CLIP, WAV_16K as WAV, unshare_works

STAGES = ("probe", "detect", "frames", "audio", "audio_features")


# --------------------------------------------------------------------------- helpers


def talk(*args, cwd: Path, quiet: bool = True, debug: bool = False, timeout: float = 120
         ) -> subprocess.CompletedProcess:
    """Run the real CLI; global options go before the subcommand."""
    cmd = [sys.executable, "-m", "talkcli.cli"]
    if debug:
        cmd.append("--debug")
    if quiet:
        cmd.append("--quiet")
    cmd += [str(a) for a in args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def ffmpeg(*args) -> None:
    proc = subprocess.run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
                           *map(str, args)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"ffmpeg {' '.join(map(str, args))} failed: {proc.stderr}"


def assert_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """Exit ``code``; stderr is one ``error:`` line (no traceback) that mentions every needle."""
    where = f"\nstdout: {proc.stdout!r}\nstderr: {proc.stderr!r}"
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}{where}"
    assert "Traceback" not in proc.stderr, where
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}{where}"
    line = lines[0]
    assert line.startswith("error:") and line[len("error:"):].strip(), where
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in the error line{where}"
    return line


def leftovers(ws: Path) -> list[str]:
    """Temporary files, staging directories, write probes and lock files left in a workspace."""
    if not ws.exists():
        return []
    found = []
    for p in ws.rglob("*"):
        rel = str(p.relative_to(ws))
        if p.name == ".tmp":
            found.append(rel + ("/" if p.is_dir() else ""))
        elif ".tmp" in p.name or p.name.startswith(".write-test-") or p.name == ".talk.lock":
            found.append(rel)
    return sorted(found)


def assert_consistent(ws: Path, *, done: tuple[str, ...] = (), missing: tuple[str, ...] = ()) -> dict[str, str]:
    """Nothing half-written and no stage record that claims outputs that are not there."""
    left = leftovers(ws)
    assert not left, f"left behind in {ws}: {left}"
    states = {}
    for row in Workspace(ws).status():
        states[row.name] = row.state
        # stale is fine only for a stage made from one that the failure left missing (it will be
        # redone with it); a stale source or a broken record is not
        if row.state == "stale":
            dep = row.reason.removeprefix("upstream ").split(" is ")[0]
            assert row.reason.startswith("upstream ") and states.get(dep) in ("missing", "stale"), \
                f"{row.name} is stale ({row.reason})"
        else:
            assert row.state in ("done", "missing"), f"{row.name} is {row.state} ({row.reason})"
        if row.state == "missing":
            assert row.record is None, f"{row.name} has a record but is missing: {row.reason}"
        else:
            for rel in row.record.get("outputs", {}):
                assert (ws / rel).exists(), f"{row.name} claims {rel}, which is not there"
    for name in done:
        assert states[name] == "done", f"{name} should still be done: {states}"
    for name in missing:
        assert states[name] == "missing", f"{name} should be missing: {states}"
    return states


needs_unshare = pytest.mark.skipif(not unshare_works(), reason="`unshare -rm` (user + mount namespaces) is not "
                                                               "permitted here, so no private tmpfs can be mounted")


# --------------------------------------------------------------------------- generated inputs


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def short_clip(media) -> Path:
    """The first 2 s of the talking-head clip (50 frames, a face in every one), stream-copied."""
    out = media / "short.mp4"
    ffmpeg("-i", CLIP, "-t", "2", "-c", "copy", out)
    return out


@pytest.fixture(scope="module")
def no_face_clip(media) -> Path:
    """3 s of a test pattern with a sine tone: a valid video with sound and no face anywhere."""
    out = media / "noface.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=3",
           "-f", "lavfi", "-i", "sine=frequency=440:duration=3",
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", out)
    return out


# --------------------------------------------------------------------------- 1-4: unreadable input


def test_text_file_named_mp4(tmp_path):
    video = tmp_path / "x.mp4"
    video.write_text("this is not a video\n")
    ws = tmp_path / "ws"
    proc = talk("preprocess", video, "-w", ws, cwd=tmp_path)
    assert_error(proc, 1, "x.mp4", "not a media file")
    assert proc.stdout == ""
    assert_consistent(ws, missing=STAGES)


def test_missing_input(tmp_path):
    ws = tmp_path / "ws"
    proc = talk("preprocess", tmp_path / "nope.mp4", "-w", ws, cwd=tmp_path)
    assert_error(proc, 1, "not found", "nope.mp4")
    assert_consistent(ws, missing=STAGES)


def test_input_is_a_directory(tmp_path):
    (tmp_path / "dir.mp4").mkdir()
    proc = talk("preprocess", tmp_path / "dir.mp4", "-w", tmp_path / "ws", cwd=tmp_path)
    assert_error(proc, 1, "not a file")
    assert_consistent(tmp_path / "ws", missing=STAGES)


def test_truncated_before_the_index(tmp_path):
    """The fixture keeps its moov atom at the end: its first 40% has no index at all."""
    data = CLIP.read_bytes()
    assert b"moov" not in data[: int(len(data) * 0.4)], "the fixture's index moved to the front"
    video = tmp_path / "cut40.mp4"
    video.write_bytes(data[: int(len(data) * 0.4)])
    ws = tmp_path / "ws"
    proc = talk("preprocess", video, "-w", ws, cwd=tmp_path)
    assert_error(proc, 1, "cut40.mp4", "truncated")
    assert_consistent(ws, missing=STAGES)
    assert not (ws / "frames").exists()


def _top_level_atoms(data: bytes) -> list[str]:
    """The order of an MP4's top-level boxes (ftyp, moov, mdat, ...)."""
    atoms, pos = [], 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8].decode("latin-1")
        if size == 1:  # 64-bit size follows the type
            size = int.from_bytes(data[pos + 8:pos + 16], "big")
        elif size == 0:  # extends to the end of the file
            size = len(data) - pos
        assert size >= 8, f"bad box size {size} at {pos}"
        atoms.append(kind)
        pos += size
    return atoms


def test_truncated_after_a_front_index(tmp_path):
    """With the index (moov) at the front the container opens fine and promises every frame; only
    counting the packets actually there shows that half the file is gone."""
    front = tmp_path / "faststart.mp4"
    ffmpeg("-i", CLIP, "-c", "copy", "-movflags", "+faststart", front)
    data = front.read_bytes()
    atoms = _top_level_atoms(data)
    assert "moov" in atoms and "mdat" in atoms and atoms.index("moov") < atoms.index("mdat"), atoms
    video = tmp_path / "cut50.mp4"
    video.write_bytes(data[: len(data) // 2])
    ws = tmp_path / "ws"
    proc = talk("preprocess", video, "-w", ws, "--size", "64", cwd=tmp_path)
    line = assert_error(proc, 1, "cut50.mp4")
    assert "truncated" in line.lower() or "damaged" in line.lower(), line
    assert proc.stdout == ""
    assert_consistent(ws, missing=STAGES)
    assert not (ws / "frames").exists()


def test_no_video_stream(tmp_path):
    ws = tmp_path / "ws"
    proc = talk("preprocess", WAV, "-w", ws, cwd=tmp_path)
    assert_error(proc, 1, WAV.name, "no video stream")
    assert proc.stdout == ""
    assert_consistent(ws, missing=STAGES)


# --------------------------------------------------------------------------- 5-6: no audio, no face


def test_no_audio_track(tmp_path, short_clip):
    """A video without sound is usable: a one-line warning, exit 0, every stage done, no audio files."""
    video = tmp_path / "silent.mp4"
    ffmpeg("-i", short_clip, "-an", "-c:v", "copy", video)
    ws = tmp_path / "ws"
    proc = talk("preprocess", video, "-w", ws, "--size", "64", cwd=tmp_path, quiet=False)
    where = f"\nstdout: {proc.stdout!r}\nstderr: {proc.stderr!r}"
    assert proc.returncode == 0, where
    assert "Traceback" not in proc.stderr and "error:" not in proc.stderr, where
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    assert any("no audio" in ln.lower() for ln in warnings), f"no 'no audio' warning line{where}"

    st = talk("status", ws, "--json", cwd=tmp_path)
    assert st.returncode == 0, st.stderr
    states = {row["name"]: row["state"] for row in json.loads(st.stdout)["stages"]}
    assert all(states.get(name) == "done" for name in STAGES), states
    assert not (ws / "audio" / "audio.wav").exists()
    assert not (ws / "audio" / "features.npz").exists()
    manifest = json.loads((ws / "workspace.json").read_text())
    assert manifest["stages"]["audio"]["summary"]["has_audio"] is False
    assert_consistent(ws, done=STAGES)


def test_no_face_in_most_frames(tmp_path, no_face_clip):
    ws = tmp_path / "ws"
    proc = talk("preprocess", no_face_clip, "-w", ws, "--size", "64", cwd=tmp_path)
    assert_error(proc, 1, "no face", "75 of 75")
    assert proc.stdout == ""
    assert_consistent(ws, done=("probe",), missing=("detect", "frames", "audio", "audio_features"))
    assert not (ws / "frames").exists()

    # --crop full skips detection and frames the centred square; the face tracker then finds no
    # face either, and says so, with the frames kept.
    proc = talk("preprocess", no_face_clip, "-w", ws, "--crop", "full", "--size", "64", cwd=tmp_path)
    assert_error(proc, 1, "face landmarks", "0 of 75")
    crop = json.loads((ws / "detect" / "crop.json").read_text())
    assert crop["method"] == "full"
    assert crop["box"] == [40, 0, 240, 240]
    assert len(list((ws / "frames").glob("*.png"))) == 75
    assert json.loads((ws / "frames" / "frames.json").read_text())["n_frames"] == 75
    assert_consistent(ws, done=("probe", "detect", "frames"), missing=("landmarks", "matting", "facefit"))


# --------------------------------------------------------------------------- 7: bad option values


@pytest.mark.parametrize("args, option", [
    (["--size", "7"], "--size"),
    (["--crop", "1,2"], "--crop"),
    (["--fps", "0"], "--fps"),
    (["--frame-format", "bmp"], "--frame-format"),
    (["--audio-features", "mfcc"], "--audio-features"),
    (["--min-face-fraction", "2"], "--min-face-fraction"),
], ids=["size", "crop", "fps", "frame-format", "audio-features", "min-face-fraction"])
def test_bad_option_value(tmp_path, short_clip, args, option):
    ws = tmp_path / "ws"
    proc = talk("preprocess", short_clip, "-w", ws, *args, cwd=tmp_path)
    assert_error(proc, 2, option)
    assert proc.stdout == ""
    assert not ws.exists(), "a workspace was created before the bad option was refused"


def test_crop_outside_the_frame(tmp_path, short_clip):
    """The frame size is known only after probe: refused then, before any frame is written."""
    ws = tmp_path / "ws"
    proc = talk("preprocess", short_clip, "-w", ws, "--crop", "400,400,300", cwd=tmp_path)
    assert_error(proc, 2, "--crop", "outside")
    assert proc.stdout == ""
    assert_consistent(ws, missing=("detect", "frames", "audio", "audio_features"))
    assert not (ws / "frames").exists()


@pytest.mark.parametrize("kind", ["hubert", "wav2vec2"])
def test_audio_features_model_not_available_yet(tmp_path, short_clip, kind):
    """Refused up front (exit 2), not after probe, detect, frames and audio have run."""
    ws = tmp_path / "ws"
    proc = talk("preprocess", short_clip, "-w", ws, "--size", "64", "--audio-features", kind, cwd=tmp_path)
    assert_error(proc, 2, kind, "not available")
    assert proc.stdout == ""
    assert not ws.exists(), "stages ran before the unavailable option was refused"


# --------------------------------------------------------------------------- 8: unwritable workspace


def test_workspace_parent_is_a_file(tmp_path, short_clip):
    blocker = tmp_path / "plain"
    blocker.write_text("keep me\n")
    proc = talk("preprocess", short_clip, "-w", blocker / "ws", cwd=tmp_path)
    assert_error(proc, 4, "plain", "in the way")
    assert proc.stdout == ""
    assert blocker.read_text() == "keep me\n"


def test_workspace_is_a_file(tmp_path, short_clip):
    blocker = tmp_path / "ws"
    blocker.write_text("keep me\n")
    proc = talk("preprocess", short_clip, "-w", blocker, cwd=tmp_path)
    assert_error(proc, 4, "ws", "file")
    assert proc.stdout == ""
    assert blocker.is_file() and blocker.read_text() == "keep me\n"


@needs_unshare
def test_workspace_on_a_read_only_filesystem(tmp_path, short_clip):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    inner = (f"mount -t tmpfs -o ro,size=1m none {shlex.quote(str(mnt))} && "
             f"exec {shlex.quote(sys.executable)} -m talkcli.cli --quiet preprocess "
             f"{shlex.quote(str(short_clip))} -w {shlex.quote(str(mnt / 'ws'))}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", inner], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert_error(proc, 4, "read-only")
    assert proc.stdout == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only (0o555) directory anyway")
def test_workspace_in_a_read_only_directory(tmp_path, short_clip):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        proc = talk("preprocess", short_clip, "-w", parent / "ws", cwd=tmp_path)
        assert_error(proc, 4, "permission denied")
        assert proc.stdout == ""
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


# --------------------------------------------------------------------------- 9: disk full

# The inspection runs inside the namespace (the tmpfs vanishes with it). It mirrors leftovers()
# and assert_consistent(): what is left half-written, and each stage's state, reason and record.
_INSPECT = """
import json, os, sys
from talkcli.workspace import Workspace
ws = sys.argv[1]
left = []
for d, dirs, files in os.walk(ws):
    rel = os.path.relpath(d, ws)
    for n in dirs:
        if n == ".tmp" or ".tmp" in n:
            left.append(os.path.join(rel, n) + "/")
    for n in files:
        if ".tmp" in n or n.startswith(".write-test-") or n == ".talk.lock":
            left.append(os.path.join(rel, n))
status = {r.name: [r.state, r.reason, r.record is not None] for r in Workspace(ws).status()}
print(json.dumps({"leftovers": sorted(left), "status": status}))
"""


@pytest.fixture(scope="module")
def disk_full_run(tmp_path_factory) -> dict:
    """``talk --quiet preprocess CLIP`` on a real 3 MB tmpfs (the 512² PNG frames need far more).

    Exit code, stdout and stderr go to files outside the tmpfs; the workspace is inspected inside
    the namespace before the tmpfs disappears with it.
    """
    base = tmp_path_factory.mktemp("diskfull")
    mnt = base / "small"
    mnt.mkdir()
    ws = mnt / "ws"
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    py = q(sys.executable)
    inner = (
        f"mount -t tmpfs -o size=3m none {q(mnt)} || exit 99; "
        f"{py} -m talkcli.cli --quiet preprocess {q(CLIP)} -w {q(ws)} >{q(base / 'out.txt')} 2>{q(base / 'err.txt')}; "
        f"echo $? >{q(base / 'rc.txt')}; "
        f"exec {py} -c {shlex.quote(_INSPECT)} {q(ws)}"
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", inner], cwd=base, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, f"the disk-full run could not be set up or inspected: {proc.stderr}"
    inspected = json.loads(proc.stdout)
    return {
        "returncode": int((base / "rc.txt").read_text()),
        "stdout": (base / "out.txt").read_text(),
        "stderr": (base / "err.txt").read_text(),
        "leftovers": inspected["leftovers"],
        "status": inspected["status"],
    }


@needs_unshare
def test_disk_full_on_a_small_filesystem(disk_full_run):
    """probe and detect fit; frames fill the disk: exit 4, nothing half-written, frames not claimed."""
    assert disk_full_run["returncode"] == 4, disk_full_run["stderr"]
    assert disk_full_run["leftovers"] == []
    status = disk_full_run["status"]
    assert status["probe"][0] == "done" and status["probe"][2], status
    assert status["detect"][0] == "done" and status["detect"][2], status
    assert status["frames"] == ["missing", "not run", False], status
    assert status["audio"] == ["missing", "not run", False], status
    assert status["audio_features"] == ["missing", "not run", False], status


@needs_unshare
def test_disk_full_prints_only_the_error_line(disk_full_run):
    proc = subprocess.CompletedProcess(["talk"], disk_full_run["returncode"], disk_full_run["stdout"],
                                       disk_full_run["stderr"])
    assert_error(proc, 4, "disk full")
    assert proc.stdout == ""


# Fallback where no private tmpfs can be mounted: the same failure in this process, with the frame
# writer made to fail with ENOSPC part-way through (it runs in the frames stage's thread pool).


@pytest.fixture
def enospc_in_process(monkeypatch, capsys):
    """Return ``run(video, ws, *options, after=N)``: ``talk --quiet preprocess`` in this process with
    every frame write after the first N failing with ENOSPC; a CompletedProcess-like result."""
    from talkcli import cli, progress
    from talkcli.preprocess import pipeline

    real_write = pipeline.write_image
    monkeypatch.setitem(cli._state, "debug", False)
    monkeypatch.setattr(progress, "_quiet", progress._quiet)  # restored afterwards

    def run(video: Path, ws: Path, *options: str, after: int = 10) -> subprocess.CompletedProcess:
        lock = threading.Lock()
        calls = {"n": 0, "failed": 0}

        def write_image(path, rgb, params):
            with lock:
                calls["n"] += 1
                full = calls["n"] > after
                calls["failed"] += full
            if full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            real_write(path, rgb, params)

        monkeypatch.setattr(pipeline, "write_image", write_image)
        argv = ["--quiet", "preprocess", str(video), "-w", str(ws), *options]
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            cli.app(argv, prog_name="talk")
        out, err = capsys.readouterr()
        assert calls["failed"], "no frame write was made to fail"
        return subprocess.CompletedProcess(argv, exited.value.code, out, err)

    return run


def test_disk_full_in_process(tmp_path, short_clip, enospc_in_process):
    ws = tmp_path / "ws"
    proc = enospc_in_process(short_clip, ws, "--crop", "full", "--size", "64", after=10)
    assert_error(proc, 4, "disk full", "frames")
    assert proc.stdout == ""
    assert_consistent(ws, done=("probe", "detect"), missing=("frames", "audio", "audio_features"))
    assert not (ws / "frames").exists()


def test_staging_dir_removed_after_a_failed_stage(tmp_path, short_clip, enospc_in_process):
    """A failed redo of frames removes its staging directory and leaves the previous frames untouched
    (but no longer claimed: the stage is missing, not done)."""
    ws = tmp_path / "ws"
    first = talk("preprocess", short_clip, "-w", ws, "--crop", "full", "--size", "64", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in (ws / "frames").iterdir()}
    assert len(before) == 51  # 50 frames and frames.json

    proc = enospc_in_process(short_clip, ws, "--crop", "full", "--size", "32", after=20)
    assert_error(proc, 4, "disk full")
    assert not (ws / ".tmp").exists()
    assert_consistent(ws, done=("probe", "detect", "audio", "audio_features"), missing=("frames",))
    after = {p.name: p.read_bytes() for p in (ws / "frames").iterdir()}
    assert after == before, "the old frames were replaced by a partial set"


# --------------------------------------------------------------------------- 10: later stages


@pytest.mark.parametrize("command", ["train", "eval", "render", "drive"])
def test_later_stages_need_a_preprocessed_workspace(tmp_path, command):
    proc = talk(command, "ws/", *(["--audio", "a.wav"] if command in ("render", "drive") else []), cwd=tmp_path,
                quiet=False)
    assert_error(proc, 1, "talk preprocess")
    assert list(tmp_path.iterdir()) == [], "nothing may be written for a workspace that does not exist"
    (tmp_path / "ws").mkdir()
    proc = talk(command, "ws/", *(["--audio", "a.wav"] if command in ("render", "drive") else []), cwd=tmp_path,
                quiet=False)
    assert_error(proc, 1, "not a talkcli workspace", "talk preprocess")
    assert list((tmp_path / "ws").iterdir()) == []


# --------------------------------------------------------------------------- --debug


def test_debug_prints_the_traceback(tmp_path):
    video = tmp_path / "x.mp4"
    video.write_text("this is not a video\n")
    proc = talk("preprocess", video, "-w", tmp_path / "ws", cwd=tmp_path, debug=True)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "talkcli.errors.InputError" in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[-1].startswith("error:") and "not a media file" in lines[-1]
    assert sum(ln.startswith("error:") for ln in lines) == 1

"""Fault injection, stage by stage: what a kill, a full or read-only disk, or a second run does.

For each command (preprocess, train, train-motion, render, eval), on a 3 s cut of the fixture at
64² with the tiny preset:

* ``kill -9`` (of the whole process group: ffmpeg and the compiler too) at a random point, then
  a rerun: the result equals an uninterrupted run's (same content hashes, same MP4 bytes, same
  metrics), or training resumes from its last checkpoint; in between, no stage claims an output
  that is not there;
* the disk fills up, or the file system turns read-only, part-way through (a private tmpfs in a
  user + mount namespace): exit 4 with one line, finished stages kept, and once the fault is gone
  the same command completes;
* a second run while one holds the workspace: exit 3 naming the holder, nothing changed.

The kill points come from ``random.Random(TALKCLI_FAULT_SEED)``; a failure message prints the seed
so that the same points can be replayed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from talkcli.workspace import Workspace, check_output

from conftest import TINY_TRAIN, copy_with_fresh_mtimes, unshare_works

HERE = Path(__file__).resolve().parent
SEED = int(os.environ.get("TALKCLI_FAULT_SEED") or random.SystemRandom().randrange(1 << 31))
CHECKPOINT_EVERY = 10  # conftest.TINY_TRAIN's
TINY = TINY_TRAIN
PRE = ("--size", "64")
PREPROCESS_STAGES = ("probe", "detect", "frames", "landmarks", "matting", "facefit", "audio", "audio_features")


# --------------------------------------------------------------------------- helpers


def cli(*args, quiet: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "talkcli.cli", *(["--quiet"] if quiet else []), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode} (seed {SEED}):\n{proc.stderr}"
    return proc


def start(*args) -> subprocess.Popen:
    """The command in its own process group, so that a kill takes its children (ffmpeg, ninja) too."""
    return subprocess.Popen([sys.executable, "-m", "talkcli.cli", "--quiet", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def kill(proc: subprocess.Popen) -> bool:
    """kill -9 the group; False when the command had already finished."""
    finished = proc.poll() is not None
    if not finished:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return not finished


def kill_after(seconds: float, *args) -> bool:
    proc = start(*args)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass
    return kill(proc)


def kill_mid_run(seconds: float, args, reset) -> None:
    """kill -9 ``args`` after ``seconds``; when a loaded machine let it finish first, ``reset()``
    what it wrote and try again sooner, so that the kill lands mid-run."""
    for _ in range(4):
        if kill_after(seconds, *args):
            return
        reset()
        seconds /= 2
    raise AssertionError(f"{args[0]} finished before every kill (seed {SEED})")


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, f"the command ended before {path.name} appeared (seed {SEED})"
        assert time.time() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.02)


def digests(ws: Path, stages=None) -> dict:
    """Every recorded output's content hash, by stage."""
    data = json.loads((ws / "workspace.json").read_text())["stages"]
    return {name: {rel: o.get("sha256") for rel, o in rec["outputs"].items()}
            for name, rec in data.items() if stages is None or name in stages}


def states(ws: Path) -> dict:
    return {r.name: r.state for r in Workspace(ws).status()}


def leftovers(ws: Path) -> list[str]:
    return sorted(str(p.relative_to(ws)) for p in ws.rglob("*")
                  if ".tmp" in p.name or p.name == ".talk.lock") if ws.exists() else []


def assert_consistent(ws: Path) -> dict:
    """After a kill: every stage with a record has its outputs, intact; the rest are missing or
    stale because of what they are made from."""
    if not (ws / "workspace.json").exists():
        return {}
    rows = {r.name: r for r in Workspace(ws).status()}
    for r in rows.values():
        where = f"{r.name}: {r.state} ({r.reason}), seed {SEED}"
        if r.state == "missing":
            assert r.record is None, where
        elif r.state == "stale":
            assert r.reason.startswith("upstream "), where
        for rel, stats in (r.record or {}).get("outputs", {}).items():
            assert check_output(ws, rel, stats)[0] in ("same", "restamped"), where
    return {n: r.state for n, r in rows.items()}


def metrics(result: dict) -> dict:
    """What eval measures, without the timings."""
    return {name: {k: v for k, v in m.items() if not k.startswith(("fps", "seconds", "ms"))}
            for name, m in result["metrics"].items()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Base:
    root: Path
    clip: Path
    speech: Path
    ws: Path            # preprocessed, trained, rendered and evaluated without a fault
    preprocessed: Path  # a copy taken before training
    times: dict
    mp4: Path
    general: dict       # talk train-motion's summary
    eval: dict


@pytest.fixture(scope="module")
def rng() -> random.Random:
    print(f"fault seed {SEED} (TALKCLI_FAULT_SEED={SEED} replays it)")
    return random.Random(SEED)


@pytest.fixture(scope="module")
def base(tiny_subject) -> Base:
    """The shared tiny subject (conftest), rendered, evaluated and given a general motion model."""
    t = tiny_subject
    root, ws, times = t["root"], t["ws"], dict(t["times"])

    def timed(name, *args):
        t0 = time.time()
        proc = ok(cli(*args))
        times[name] = time.time() - t0
        return proc

    timed("render", "render", ws, "--audio", t["speech"], "-o", root / "base.mp4")
    ev = json.loads(timed("eval", "eval", ws, "--json").stdout)
    general = json.loads(timed("train-motion", "train-motion", ws, "-o", root / "general.pt", "--json").stdout)
    return Base(root, t["clip"], t["speech"], ws, t["preprocessed"], times, root / "base.mp4", general, ev)


def command(stage: str, base: Base, ws: Path, out: Path) -> list:
    return {
        "preprocess": ["preprocess", base.clip, "-w", ws, *PRE],
        "train": ["train", ws, *TINY],
        "train-motion": ["train-motion", ws, "-o", out / "general.pt", "--json"],
        "render": ["render", ws, "--audio", base.speech, "-o", out / "out.mp4"],
        "eval": ["eval", ws, "--json"],
    }[stage]


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- kill -9 and rerun


def test_preprocess_killed_twice_reruns_to_the_same_artifacts(base, tmp_path, rng):
    ws = tmp_path / "ws"
    cmd = command("preprocess", base, ws, tmp_path)
    for _ in range(2):
        kill_after(rng.uniform(0.1, 0.95) * base.times["preprocess"], *cmd)
        assert_consistent(ws)
    ok(cli(*cmd))
    assert leftovers(ws) == []
    assert all(states(ws)[s] == "done" for s in PREPROCESS_STAGES)
    assert digests(ws, PREPROCESS_STAGES) == digests(base.ws, PREPROCESS_STAGES), f"seed {SEED}"


def test_train_killed_resumes_from_its_last_checkpoint(base, tmp_path, rng):
    ws = copy_of(base.preprocessed, tmp_path / "ws")
    cmd = command("train", base, ws, tmp_path)
    ckpt = ws / "models" / "r2talker" / "checkpoint.pt"
    proc = start(*cmd)  # once a checkpoint is there, somewhere in the next interval
    wait_for(ckpt, proc)
    time.sleep(rng.uniform(0, 2.0))
    kill(proc)
    assert assert_consistent(ws)["train_r2talker"] == "missing"
    assert ckpt.is_file()
    # a second kill anywhere in the rerun (it may land in the motion stage, after the avatar)
    kill_after(rng.uniform(0.1, 0.9) * base.times["train"], *cmd)
    after = assert_consistent(ws)
    done = ok(cli(*cmd, "--json", quiet=False))
    summary = json.loads(done.stdout)
    if after["train_r2talker"] == "done":
        assert summary["skipped"], f"a trained avatar was trained again (seed {SEED})"
    else:
        m = re.search(r"resuming from iteration (\d+) of (\d+)", done.stderr)
        assert m and summary["resumed"], f"training did not resume (seed {SEED}):\n{done.stderr}"
        assert int(m.group(1)) > 0 and int(m.group(1)) % CHECKPOINT_EVERY == 0
    assert states(ws)["train_r2talker"] == states(ws)["train_motion"] == "done"
    assert not ckpt.exists() and leftovers(ws) == []


def test_train_motion_killed_reruns_to_the_same_model(base, tmp_path, rng):
    cmd = command("train-motion", base, base.ws, tmp_path)
    out = tmp_path / "general.pt"
    kill_mid_run(rng.uniform(0.2, 0.9) * base.times["train-motion"], cmd, lambda: out.unlink())
    assert not out.exists(), "a killed train-motion left a model file"
    again = json.loads(ok(cli(*cmd)).stdout)
    assert again["eval"] == base.general["eval"], f"seed {SEED}"
    assert [p.name for p in tmp_path.iterdir()] == ["general.pt"]


def test_render_killed_leaves_no_mp4_and_reruns_to_the_same_bytes(base, tmp_path, rng):
    ws = copy_of(base.ws, tmp_path / "ws")
    out_dir = tmp_path / "out"
    cmd = command("render", base, ws, out_dir)
    proc = start(*cmd)  # once it holds the workspace, somewhere in the rendering
    wait_for(ws / ".talk.lock", proc)
    time.sleep(rng.uniform(0.05, 0.5) * base.times["render"])
    assert kill(proc)
    if (out_dir / "out.mp4").exists():  # killed on its way out: the MP4 was complete
        assert sha256(out_dir / "out.mp4") == sha256(base.mp4), f"a killed render left a partial MP4 (seed {SEED})"
    assert_consistent(ws)
    ok(cli(*cmd))
    assert sha256(out_dir / "out.mp4") == sha256(base.mp4), f"seed {SEED}"
    assert [p.name for p in out_dir.iterdir()] == ["out.mp4"], "the killed render's temporary file is left"
    assert leftovers(ws) == []


def test_eval_killed_reruns_to_the_same_metrics(base, tmp_path, rng):
    ws = copy_of(base.ws, tmp_path / "ws")
    shutil.rmtree(ws / "eval")
    cmd = command("eval", base, ws, tmp_path)
    kill_mid_run(rng.uniform(0.2, 0.9) * base.times["eval"], cmd, lambda: shutil.rmtree(ws / "eval"))
    assert_consistent(ws)
    again = json.loads(ok(cli(*cmd)).stdout)
    assert metrics(again) == metrics(base.eval), f"seed {SEED}"
    assert leftovers(ws) == []


# --------------------------------------------------------------------------- disk full, read-only


@pytest.mark.skipif(not unshare_works(), reason="`unshare -rm` (user + mount namespaces) is not permitted here")
@pytest.mark.parametrize("stage, fault", [  # (preprocess on a full disk: test_bad_input.py)
    # read-only where files are written one by one; an MP4 is open for writing while it renders,
    # and the kernel refuses to make a file system read-only under an open writer
    ("preprocess", "readonly"), ("train", "full"), ("render", "full"), ("eval", "readonly"),
])
def test_disk_fault_mid_stage_is_one_line_and_the_rerun_completes(base, tmp_path, rng, stage, fault):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ws = mnt / "ws"
    seed = {} if stage == "preprocess" else {"ws": str(base.preprocessed if stage == "train" else base.ws)}
    cmd = command(stage, base, ws, mnt)
    # once the command holds the workspace, early enough that its writes are still to come
    trigger, delay = "ws/.talk.lock", rng.uniform(0.05, 0.4) * base.times[stage]
    if stage == "train":  # after the first checkpoint, so that the rerun has one to resume from
        trigger, delay = "ws/models/r2talker/checkpoint.pt", rng.uniform(0, 1.0)
    spec = {"mount": str(mnt), "size_mb": 64, "seed_dirs": seed, "fault": fault, "trigger": trigger,
            "delay": delay, "argv": [str(a) for a in cmd], "workspace": "ws", "result": str(tmp_path / "r.json")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run(["unshare", "-rm", sys.executable, str(HERE / "fault_inner.py"), str(tmp_path / "spec.json")],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    first, rerun = res["fault"], res["rerun"]
    where = f"(seed {SEED}, fault at {first['fault_at']} s)\n{first['stderr']}"
    assert first["running_at_fault"], f"the command finished before the fault {where}"
    assert first["returncode"] == 4, where
    lines = first["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in first["stderr"], where
    assert ("disk full" if fault == "full" else "read-only") in lines[0], where
    for name, (state, reason) in first["status"].items():  # nothing claimed that is not there
        assert state in ("done", "missing") or reason.startswith("upstream "), f"{name}: {state} {reason} {where}"
        if stage != "preprocess" and name in PREPROCESS_STAGES:
            assert state == "done", f"a finished stage was lost: {name} {where}"
    assert rerun["returncode"] == 0, rerun["stderr"]
    assert rerun["leftovers"] == [], rerun["leftovers"]
    for name, (state, reason) in rerun["status"].items():
        assert state == "done" or (state, reason) == ("missing", "not run"), f"{name}: {state} {reason}"
    assert all(rerun["status"][s][0] == "done" for s in PREPROCESS_STAGES)


# --------------------------------------------------------------------------- a second run


HOLDER = textwrap.dedent("""
    import sys, time
    from talkcli.workspace import Workspace
    with Workspace(sys.argv[1]).locked("talk train (the first run)"):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_second_run_on_a_busy_workspace_exits_3(base, tmp_path):
    """Every command that uses a workspace, started (all at once) while a run holds it."""
    ws = copy_of(base.ws, tmp_path / "ws")
    before = digests(ws)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ws)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cmds = {stage: command(stage, base, ws, tmp_path) for stage in ("preprocess", "train", "train-motion",
                                                                          "render", "eval")}
        cmds["drive"] = ["drive", ws, "--audio", base.speech]
        procs = {stage: subprocess.Popen([sys.executable, "-m", "talkcli.cli", "--quiet", *map(str, cmd)],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for stage, cmd in cmds.items()}
        results = {stage: (p.wait(timeout=120), p.stderr.read()) for stage, p in procs.items()}
    finally:
        holder.kill()
        holder.wait()
    for stage, (code, err) in results.items():
        lines = err.splitlines()
        assert code == 3, f"{stage}: exit {code}\n{err}"
        assert len(lines) == 1 and "in use by pid" in lines[0] and str(holder.pid) in lines[0], f"{stage}: {err}"
    assert digests(ws) == before
    assert not (tmp_path / "general.pt").exists() and not (tmp_path / "out.mp4").exists()


# --------------------------------------------------------------------------- a copied workspace


def test_copied_workspace_keeps_its_work_and_one_changed_byte_counts(base, tmp_path):
    ws = tmp_path / "copy"
    copy_with_fresh_mtimes(base.ws, ws)
    rows = json.loads(ok(cli("status", ws, "--json")).stdout)["stages"]
    assert {r["name"]: r["state"] for r in rows} == states(base.ws)
    assert {s for s, v in states(base.ws).items() if v == "done"} >= {*PREPROCESS_STAGES, "train_r2talker",
                                                                    "train_motion"}
    out = tmp_path / "out.mp4"
    ok(cli("render", ws, "--audio", base.speech, "-o", out))
    assert sha256(out) == sha256(base.mp4)
    assert json.loads(ok(cli("train", ws, *TINY, "--json")).stdout)["skipped"]  # nothing is redone

    fit = ws / "facefit.npz"
    data = bytearray(fit.read_bytes())
    data[len(data) // 2] ^= 0x01
    fit.write_bytes(bytes(data))
    rows = {r["name"]: (r["state"], r["reason"]) for r in json.loads(ok(cli("status", ws, "--json")).stdout)["stages"]}
    assert rows["facefit"] == ("stale", "output changed: facefit.npz")
    assert rows["train_r2talker"] == rows["train_motion"] == ("stale", "upstream facefit is stale")
    assert rows["landmarks"][0] == rows["matting"][0] == rows["audio_features"][0] == "done"
    proc = cli("render", ws, "--audio", base.speech, "-o", tmp_path / "again.mp4")
    assert proc.returncode == 1 and "facefit" in proc.stderr and "talk preprocess" in proc.stderr, proc.stderr

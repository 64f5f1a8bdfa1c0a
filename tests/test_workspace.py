"""The workspace mechanism on its own: keys, skipping, staleness, atomic writes, the lock."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from talkcli import workspace as wsmod
from talkcli.errors import WorkspaceLocked
from talkcli.workspace import Workspace, atomic_path, fingerprint_key, run_stage, source_fingerprint

from conftest import copy_with_fresh_mtimes


@pytest.fixture
def graph(monkeypatch):
    """A small stage graph: a <- b <- c, with a made from a source file."""
    monkeypatch.setattr(wsmod, "STAGES", {"a": (), "b": ("a",), "c": ("b",)})


def _write(ws: Workspace, rel: str, text: str) -> dict:
    path = ws.path(rel)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return {"wrote": rel}


def _run_all(ws: Workspace, src, cfg_b: int = 1, force: bool = False) -> dict:
    fp = source_fingerprint(src, previous=ws.source(), workspace=ws.root)
    ws.set_source(fp)
    calls = {}
    a = run_stage(ws, "a", code_version=1, config={}, inputs={"source": fingerprint_key(fp)}, outputs=["a.txt"],
                  fn=lambda: _write(ws, "a.txt", src.read_text()), force=force)
    b = run_stage(ws, "b", code_version=1, config={"x": cfg_b}, inputs={"a": a.record["output_key"]}, outputs=["b.txt"],
                  fn=lambda: _write(ws, "b.txt", f"b{cfg_b}"), force=force)
    c = run_stage(ws, "c", code_version=1, config={}, inputs={"b": b.record["output_key"]}, outputs=["c.txt"],
                  fn=lambda: _write(ws, "c.txt", "c"), force=force)
    for r in (a, b, c):
        calls[r.name] = not r.skipped
    return calls


def _done(tmp_path) -> tuple:
    """A source file and a workspace with a, b and c done from it."""
    src = tmp_path / "src.txt"
    src.write_text("hello")
    ws = Workspace(tmp_path / "ws")
    ws.create()
    _run_all(ws, src)
    return src, ws


def _states(ws: Workspace) -> dict:
    return {s.name: s.state for s in ws.status()}


def test_skip_rerun_and_downstream(tmp_path, graph):
    src = tmp_path / "src.txt"
    src.write_text("hello")
    ws = Workspace(tmp_path / "ws")
    ws.create()
    assert _states(ws) == {"a": "missing", "b": "missing", "c": "missing"}
    assert _run_all(ws, src) == {"a": True, "b": True, "c": True}
    assert _states(ws) == {"a": "done", "b": "done", "c": "done"}
    assert _run_all(ws, src) == {"a": False, "b": False, "c": False}
    # a config change of b redoes b and c, not a
    assert _run_all(ws, src, cfg_b=2) == {"a": False, "b": True, "c": True}
    assert _run_all(ws, src, cfg_b=2, force=True) == {"a": True, "b": True, "c": True}


def test_source_change_marks_everything_stale(tmp_path, graph):
    src, ws = _done(tmp_path)
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: the content is the same
    assert _states(ws) == {"a": "done", "b": "done", "c": "done"}
    assert _run_all(ws, src) == {"a": False, "b": False, "c": False}
    src.write_text("hellO")  # same size, another content
    states = {s.name: (s.state, s.reason) for s in ws.status()}
    assert states["a"] == ("stale", "source file changed")
    assert states["b"] == ("stale", "upstream a is stale")
    assert _run_all(ws, src) == {"a": True, "b": True, "c": True}


def test_copied_workspace_and_source_keep_every_stage(tmp_path, graph):
    """Workspace and source moved together to another place with new mtimes: nothing is redone,
    the stamps are recorded once (the next check hashes nothing), and the source is found again
    beside the workspace."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "src.txt").write_text("hello")
    ws = Workspace(home / "ws")
    ws.create()
    (ws.root / "dir").mkdir()
    (ws.root / "dir" / "1.bin").write_bytes(b"one")
    _run_all(ws, home / "src.txt")
    copy_with_fresh_mtimes(home, tmp_path / "elsewhere")
    shutil.rmtree(home)
    copy = Workspace(tmp_path / "elsewhere" / "ws")
    rows = {s.name: (s.state, s.reason) for s in copy.status()}
    assert rows == {"a": ("done", ""), "b": ("done", ""), "c": ("done", "")}
    with copy.locked("test"):  # records the new stamps and where the source is now
        pass
    assert copy.source()["path"] == str((tmp_path / "elsewhere" / "src.txt").resolve())
    for rec in copy.manifest()["stages"].values():
        for rel, stats in rec["outputs"].items():
            assert wsmod.check_output(copy.root, rel, stats) == ("same", None)
    assert _run_all(copy, tmp_path / "elsewhere" / "src.txt") == {"a": False, "b": False, "c": False}


def test_workspace_without_its_source_keeps_its_stages(tmp_path, graph):
    src, ws = _done(tmp_path)
    src.unlink()
    rows = {s.name: (s.state, s.reason) for s in ws.status()}
    assert rows["a"] == ("done", "source video not found; its outputs are kept")
    assert rows["b"] == rows["c"] == ("done", "")


@pytest.mark.parametrize("where", ["file", "dir"])
def test_one_changed_byte_makes_the_stage_and_its_downstream_stale(tmp_path, where, monkeypatch):
    monkeypatch.setattr(wsmod, "STAGES", {"a": (), "b": ("a",), "c": ("b",)})
    ws = Workspace(tmp_path / "ws")
    ws.create()

    def write_dir():
        with ws.staging_dir("d") as d:
            (d / "x.bin").write_bytes(b"abcdef")
            (d / "sub").mkdir()
            (d / "sub" / "y.bin").write_bytes(b"012345")
        return {}

    a = run_stage(ws, "a", code_version=1, config={}, inputs={}, outputs=["a.txt"],
                  fn=lambda: _write(ws, "a.txt", "aaaa"))
    b = run_stage(ws, "b", code_version=1, config={}, inputs={"a": a.record["output_key"]},
                  outputs=["b.txt", "d"], fn=lambda: (_write(ws, "b.txt", "bbbb"), write_dir())[1])
    run_stage(ws, "c", code_version=1, config={}, inputs={"b": b.record["output_key"]}, outputs=["c.txt"],
              fn=lambda: _write(ws, "c.txt", "c"))
    target = ws.path("b.txt") if where == "file" else ws.path("d/sub/y.bin")
    data = bytearray(target.read_bytes())
    data[2] ^= 1
    copy_with_fresh_mtimes(ws.root, tmp_path / "copy")  # a copy, then the change
    copy = Workspace(tmp_path / "copy")
    (copy.root / target.relative_to(ws.root)).write_bytes(bytes(data))
    rows = {s.name: (s.state, s.reason) for s in copy.status()}
    assert rows["a"] == ("done", "")
    assert rows["b"] == ("stale", f"output changed: {'b.txt' if where == 'file' else 'd'}")
    assert rows["c"] == ("stale", "upstream b is stale")


def test_records_of_older_versions_survive_a_copy(tmp_path, graph):
    """Records written before content hashes (size + mtime only, a source key with the mtime):
    after a copy their stages stay done, and preprocess-style reruns skip them."""
    src, ws = _done(tmp_path)
    data = ws.manifest()
    for rec in data["stages"].values():
        for stats in rec["outputs"].values():
            stats.pop("sha256", None)
    fp = data["source"]
    old_key = f"{fp['size']}:{fp['mtime_ns']}:{fp['sha256']}"
    a = data["stages"]["a"]
    a["inputs"]["source"] = old_key
    a["key"] = wsmod.stage_key("a", 1, {}, a["inputs"])
    ws._write_manifest(data)
    copy_with_fresh_mtimes(tmp_path / "ws", tmp_path / "copy")
    os.utime(src, ns=(time.time_ns() + 10**10,) * 2)
    copy = Workspace(tmp_path / "copy")
    assert _states(copy) == {"a": "done", "b": "done", "c": "done"}
    assert _run_all(copy, src) == {"a": False, "b": False, "c": False}


def test_redone_upstream_makes_downstream_stale(tmp_path, graph):
    src, ws = _done(tmp_path)
    fp = ws.source()
    a = ws.record("a")
    run_stage(ws, "b", code_version=1, config={"x": 9}, inputs={"a": a["output_key"]}, outputs=["b.txt"],
              fn=lambda: _write(ws, "b.txt", "b9"))
    states = {s.name: (s.state, s.reason) for s in ws.status()}
    assert states["b"][0] == "done"
    assert states["c"] == ("stale", "upstream b was redone")
    assert fp == ws.source()


def test_removed_output_is_missing_and_redone(tmp_path, graph):
    src, ws = _done(tmp_path)
    ws.path("b.txt").unlink()
    assert _states(ws)["b"] == "missing"
    assert _run_all(ws, src) == {"a": False, "b": True, "c": True}  # b was remade: c is made from it


def test_failed_stage_keeps_no_record_and_no_partial_output(tmp_path, graph):
    ws = Workspace(tmp_path / "ws")
    ws.create()

    def boom():
        with ws.staging_dir("out") as d:
            (d / "1.txt").write_text("partial")
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        run_stage(ws, "a", code_version=1, config={}, inputs={}, outputs=["out"], fn=boom)
    assert ws.record("a") is None
    assert not ws.path("out").exists()
    assert not ws.path(".tmp").exists()  # the staging area is removed when empty


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_text("new, half written")
            raise ValueError
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_lock_in_process(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with ws.locked("first"):
        with pytest.raises(WorkspaceLocked, match=f"pid {os.getpid()}.*first"):
            with Workspace(tmp_path / "ws").locked("second"):
                pass
    with ws.locked("again"):  # released
        pass
    assert not (ws.root / ".talk.lock").exists()


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    root = tmp_path / "ws"
    code = textwrap.dedent(f"""
        import time, sys
        from talkcli.workspace import Workspace
        with Workspace({str(root)!r}).locked("holder"):
            print("locked", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(WorkspaceLocked, match=f"pid {proc.pid}"):
            with Workspace(root).locked("second"):
                pass
    finally:
        proc.kill()
        proc.wait()
    with Workspace(root).locked("after the kill"):  # no stale lock
        holder = json.loads((root / ".talk.lock").read_text())
        assert holder["pid"] == os.getpid()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not a manifest"])
def test_damaged_manifest_is_restored_from_its_backup(tmp_path, graph, damage, capsys):
    src, ws = _done(tmp_path)
    text = ws.manifest_path.read_text()
    ws.manifest_path.write_text({"truncated": text[: len(text) // 2], "garbage": "\x00\x01garbage",
                                 "empty": "", "not a manifest": "[1, 2]"}[damage])
    assert _states(ws) == {"a": "done", "b": "done", "c": "done"}
    assert "using its backup" in capsys.readouterr().err
    assert json.loads(ws.manifest_path.read_text())["stages"].keys() == {"a", "b", "c"}  # put back
    assert _run_all(ws, src) == {"a": False, "b": False, "c": False}


def test_damaged_manifest_without_a_backup_names_the_file_and_what_to_run(tmp_path, graph):
    from talkcli.errors import TalkError

    src, ws = _done(tmp_path)
    ws.manifest_path.write_text("{ broken")
    ws.backup_path.unlink()
    with pytest.raises(TalkError, match=r"workspace\.json is damaged .*`talk preprocess VIDEO -w"):
        ws.status()

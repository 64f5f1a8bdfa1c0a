"""Per-subject workspace: manifest of stage records, fingerprints, locking, atomic writes.

A workspace is one directory per subject. ``workspace.json`` holds one record per stage:

    key       hash of (stage name, stage code version, effective config, input keys)
    inputs    what the stage was made from: upstream stage keys, or the source fingerprint
    config    the configuration fields that matter to the stage
    outputs   relative paths with their size (files) or file count and bytes (directories)
    version   talkcli version that wrote it; started/seconds; summary (stage-specific numbers)

A stage is *done* when its record exists, its outputs are intact and its inputs still match the
current upstream records; *stale* when an input changed (the upstream was redone, the source was
modified) or an upstream is not done; *missing* otherwise. Keys chain, so redoing one stage makes
everything downstream stale without any explicit invalidation step.

Every write goes to a temporary file or directory inside the workspace and is moved into place with
``os.replace``; a stage's record is dropped before its outputs are replaced and written back after,
so a run killed at any point leaves either the old good state or a stage marked missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from . import __version__
from .errors import StorageError, TalkError, WorkspaceLocked, storage_error

MANIFEST = "workspace.json"
LOCKFILE = ".talk.lock"
TMPDIR = ".tmp"
MANIFEST_FORMAT = 1

# The stage graph: stage -> stages it is made from. Later stages (landmarks, matting, facefit,
# train, ...) join here; status and staleness follow from this table alone.
STAGES: dict[str, tuple[str, ...]] = {
    "probe": (),
    "detect": ("probe",),
    "frames": ("detect",),
    "landmarks": ("frames",),
    "matting": ("frames", "landmarks"),
    "facefit": ("frames", "landmarks"),
    "audio": ("probe",),
    "audio_features": ("audio",),
    "train_r2talker": ("frames", "landmarks", "matting", "facefit"),
    "train_meshhash": ("frames", "landmarks", "matting", "facefit"),
    "train_motion": ("landmarks", "facefit", "audio_features"),
}


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: Path, what: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The temporary name keeps the suffix so that writers that look at it (numpy, soundfile) work.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quiet(tmp)
        raise storage_error(exc, str(what or path)) from exc
    except BaseException:
        _unlink_quiet(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    data = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _unlink_quiet(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# --------------------------------------------------------------------------- fingerprints


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_fingerprint(path: Path, previous: dict | None = None) -> dict:
    """Size, mtime and content hash of an input file.

    The hash is reused from ``previous`` when size and mtime are unchanged, so that checking an
    up-to-date workspace does not re-read a large video.
    """
    st = os.stat(path)
    fp = {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if previous and previous.get("size") == fp["size"] and previous.get("mtime_ns") == fp["mtime_ns"]:
        fp["sha256"] = previous["sha256"]
    else:
        fp["sha256"] = file_sha256(path)
    return fp


def fingerprint_key(fp: dict) -> str:
    """The part of a fingerprint that identifies the input (not where it lives)."""
    return f"{fp['size']}:{fp['mtime_ns']}:{fp['sha256']}"


def stage_key(name: str, code_version: int, config: dict, inputs: dict) -> str:
    blob = json.dumps([name, code_version, config, inputs], sort_keys=True, default=_json_default)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def output_stats(root: Path, rel: str) -> dict | None:
    """Cheap identity of an output: size+mtime for a file, count+bytes for a directory."""
    p = root / rel
    if p.is_file():
        st = p.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if p.is_dir():
        n = total = 0
        with os.scandir(p) as it:
            for entry in it:
                if entry.is_file():
                    n += 1
                    total += entry.stat().st_size
        return {"files": n, "bytes": total}
    return None


# --------------------------------------------------------------------------- the workspace


@dataclasses.dataclass
class StageStatus:
    name: str
    state: str  # done | stale | missing
    reason: str
    record: dict | None


class Workspace:
    def __init__(self, root: Path | str):
        self.root = Path(root).absolute()

    # ---- creation and locking

    def create(self) -> None:
        """Make the directory and prove it is writable, with a message that says why not."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError as exc:
            raise StorageError(f"cannot use {self.root} as a workspace: a file with that name exists") from exc
        except OSError as exc:
            raise storage_error(exc, f"workspace {self.root}") from exc
        if not self.root.is_dir():
            raise StorageError(f"cannot use {self.root} as a workspace: not a directory")
        probe = self.root / f".write-test-{os.getpid()}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise storage_error(exc, f"workspace {self.root}") from exc

    @contextlib.contextmanager
    def locked(self, command: str) -> Iterator["Workspace"]:
        """Hold an exclusive lock on the workspace for the duration of a command.

        The lock is a ``flock`` on the workspace directory itself: the kernel releases it when the
        process dies, so a killed run never leaves a stale lock, and nothing in the workspace is
        created or changed by locking. ``.talk.lock`` names the holder while it runs (for the
        message another run prints) and is removed afterwards.
        """
        self.create()
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise storage_error(exc, str(self.root)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkspaceLocked(f"workspace {self.root} is in use by {self._holder()}; "
                                  "wait for it to finish or stop it") from None
        holder = self.root / LOCKFILE
        try:
            try:
                holder.write_text(json.dumps({
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "command": command,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                }))
            except OSError as exc:
                raise storage_error(exc, str(holder)) from exc
            self._clean_tmp()
            yield self
        finally:
            _unlink_quiet(holder)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _holder(self) -> str:
        try:
            info = json.loads((self.root / LOCKFILE).read_text())
            return f"pid {info['pid']} on {info['host']} ({info['command']}, started {info['started']})"
        except (OSError, ValueError, KeyError):
            return "another process"

    def _clean_tmp(self) -> None:
        """Remove what an interrupted run left in the staging area (we hold the lock)."""
        tmp = self.root / TMPDIR
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        for stray in self.root.glob(".*.tmp*"):
            _unlink_quiet(stray)

    def remove_if_unused(self) -> None:
        """Delete a workspace that holds no finished stage (a first run that failed early)."""
        if self.root.is_dir() and not self.manifest()["stages"]:
            shutil.rmtree(self.root, ignore_errors=True)

    # ---- manifest

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def is_workspace(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"format": MANIFEST_FORMAT, "source": None, "stages": {}}
        try:
            data = read_json(self.manifest_path)
        except (OSError, ValueError) as exc:
            raise TalkError(f"the workspace manifest {self.manifest_path} is unreadable ({exc}); "
                            "move it away to start the workspace afresh") from exc
        data.setdefault("stages", {})
        return data

    def _write_manifest(self, data: dict) -> None:
        data["format"] = MANIFEST_FORMAT
        data["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        write_json(self.manifest_path, data)

    def record(self, name: str) -> dict | None:
        return self.manifest()["stages"].get(name)

    def set_source(self, fp: dict) -> None:
        data = self.manifest()
        data["source"] = fp
        self._write_manifest(data)

    def source(self) -> dict | None:
        return self.manifest().get("source")

    def commit(self, record: dict) -> None:
        data = self.manifest()
        data["stages"][record["name"]] = record
        self._write_manifest(data)

    def drop(self, name: str) -> None:
        data = self.manifest()
        if data["stages"].pop(name, None) is not None:
            self._write_manifest(data)

    # ---- staging of outputs

    def path(self, rel: str) -> Path:
        return self.root / rel

    @contextlib.contextmanager
    def staging_dir(self, rel: str) -> Iterator[Path]:
        """Yield an empty directory; on success it becomes ``rel`` (replacing the old one)."""
        final = self.root / rel
        stage = self.root / TMPDIR / f"{rel.replace('/', '_')}-{uuid.uuid4().hex[:8]}"
        try:
            stage.mkdir(parents=True)
            yield stage
            final.parent.mkdir(parents=True, exist_ok=True)
            old = None
            if final.exists():
                old = self.root / TMPDIR / f"old-{rel.replace('/', '_')}-{uuid.uuid4().hex[:8]}"
                os.replace(final, old)
            os.replace(stage, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            shutil.rmtree(stage, ignore_errors=True)
            raise storage_error(exc, str(final)) from exc
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        finally:
            with contextlib.suppress(OSError):  # only succeeds when nothing else is staged
                (self.root / TMPDIR).rmdir()

    # ---- status

    def status(self) -> list[StageStatus]:
        data = self.manifest()
        stages = data["stages"]
        source = data.get("source")
        source_now = None
        if source:
            try:
                source_now = source_fingerprint(Path(source["path"]), previous=source)
            except OSError:
                source_now = None
        result: dict[str, StageStatus] = {}
        for name, deps in STAGES.items():
            rec = stages.get(name)
            if rec is None:
                result[name] = StageStatus(name, "missing", "not run", None)
                continue
            broken = [rel for rel, stats in rec.get("outputs", {}).items()
                      if output_stats(self.root, rel) != stats]
            if broken:
                result[name] = StageStatus(name, "missing", f"output changed or removed: {broken[0]}", rec)
                continue
            reason = ""
            for dep in deps:
                dep_status = result[dep]
                if dep_status.state != "done":
                    reason = f"upstream {dep} is {dep_status.state}"
                elif rec["inputs"].get(dep) != dep_status.record.get("output_key"):
                    reason = f"upstream {dep} was redone"
                if reason:
                    break
            if not deps and "source" in rec["inputs"]:
                if source_now is None:
                    reason = "source file is gone"
                elif rec["inputs"]["source"] != fingerprint_key(source_now):
                    reason = "source file changed"
            if reason:
                result[name] = StageStatus(name, "stale", reason, rec)
            else:
                result[name] = StageStatus(name, "done", "", rec)
        # Records of stages this version does not know (written by a newer talkcli) are shown too.
        for name, rec in stages.items():
            if name not in result:
                result[name] = StageStatus(name, "done", "unknown stage", rec)
        return list(result.values())


# --------------------------------------------------------------------------- running a stage


@dataclasses.dataclass
class StageResult:
    name: str
    record: dict
    skipped: bool


def run_stage(
    ws: Workspace,
    name: str,
    *,
    code_version: int,
    config: dict,
    inputs: dict,
    outputs: list[str],
    fn: Callable[[], dict],
    force: bool = False,
) -> StageResult:
    """Run ``fn`` unless the stage's record says it is up to date.

    ``fn`` writes ``outputs`` (paths relative to the workspace, each atomically) and returns a
    summary dict stored in the record. ``inputs`` maps upstream stage names to their records'
    ``output_key`` (or ``source`` to the source fingerprint key).
    """
    key = stage_key(name, code_version, config, inputs)
    rec = ws.record(name)
    if (
        not force
        and rec is not None
        and rec.get("key") == key
        and "output_key" in rec  # records written before output keys existed are redone
        and all(output_stats(ws.root, rel) == stats for rel, stats in rec.get("outputs", {}).items())
    ):
        return StageResult(name, rec, skipped=True)
    # From here until the new record is committed the stage counts as missing: a run killed
    # half-way is redone next time instead of trusting a mix of old and new outputs.
    ws.drop(name)
    started = time.time()
    summary = fn()
    outputs_now = {rel: output_stats(ws.root, rel) for rel in outputs if (ws.root / rel).exists()}
    record = {
        "name": name,
        "key": key,
        # What downstream stages record as their input: the key plus the identity of the outputs
        # actually written, so outputs that are remade (even from the same inputs) or replaced by
        # hand make everything downstream stale.
        "output_key": stage_key(name, code_version, outputs_now, {"key": key}),
        "code_version": code_version,
        "inputs": inputs,
        "config": config,
        "outputs": outputs_now,
        "version": __version__,
        "python": sys.version.split()[0],
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 3),
        "summary": summary,
    }
    ws.commit(record)
    return StageResult(name, record, skipped=False)


__all__ = [
    "STAGES",
    "StageResult",
    "StageStatus",
    "Workspace",
    "atomic_path",
    "file_sha256",
    "fingerprint_key",
    "output_stats",
    "read_json",
    "run_stage",
    "source_fingerprint",
    "stage_key",
    "write_json",
]

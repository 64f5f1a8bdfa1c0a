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
import glob
import hashlib
import json
import os
import re
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
MANIFEST_BACKUP = ".workspace.json.bak"
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


# Temporary names: ".<stem>.<random>-<pid>.tmp<suffix>" beside the target. The pid lets a later
# writer of the same path, or the next locked run of the workspace, remove what a killed run left.
_TMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}-(\d+)\.tmp(\.[^.]+)?$")
_OLD_TMP = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp(\.[^.]+)?$")  # written before the pid was in the name


@contextlib.contextmanager
def atomic_path(path: Path, what: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The temporary name keeps the suffix so that writers that look at it (numpy, soundfile) work.
    Temporary files of the same target left by a process that is gone (a kill) are removed first.
    """
    path = Path(path)
    _sweep_dead(path.parent, f".{glob.escape(path.stem)}.*.tmp{glob.escape(path.suffix)}")
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}-{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quiet(tmp)
        raise storage_error(exc, str(what or path)) from exc
    except BaseException:
        _unlink_quiet(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def _sweep_dead(folder: Path, pattern: str) -> None:
    with contextlib.suppress(OSError):
        for stray in folder.glob(pattern):
            m = _TMP_NAME.match(stray.name)
            if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
                _unlink_quiet(stray)


def write_json(path: Path, obj: Any) -> None:
    data = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def write_torch(path: Path, obj: Any) -> None:
    """``torch.save`` atomically. Through a Python file object, so that a full disk raises
    OSError(ENOSPC) (torch's own file writer reports it as a RuntimeError with no errno)."""
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
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
    with contextlib.suppress(OSError):  # best effort: a read-only file system keeps it
        os.unlink(path)


# --------------------------------------------------------------------------- fingerprints


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_fingerprint(path: Path, previous: dict | None = None, *, workspace: Path | None = None) -> dict:
    """Size, mtime and content hash of an input file (and where it is, relative to ``workspace``).

    The hash is reused from ``previous`` when size and mtime are unchanged, so that checking an
    up-to-date workspace does not re-read a large video. The relative path lets a workspace moved
    together with its video find it again.
    """
    st = os.stat(path)
    fp = {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if workspace is not None:
        fp["relpath"] = os.path.relpath(Path(path).resolve(), Path(workspace).resolve())
    if previous and previous.get("size") == fp["size"] and previous.get("mtime_ns") == fp["mtime_ns"]:
        fp["sha256"] = previous["sha256"]
    else:
        fp["sha256"] = file_sha256(path)
    return fp


def fingerprint_key(fp: dict) -> str:
    """The part of a fingerprint that identifies the input: its content, not where it lives nor
    when it was copied there."""
    return f"{fp['size']}:{fp['sha256']}"


def same_source(recorded_key: str, fp: dict) -> bool:
    """Whether a recorded source key names the content of ``fp``. Keys written before 0.1.1 also
    hold the mtime (``size:mtime:sha256``); only size and hash are compared."""
    parts = str(recorded_key).split(":")
    return len(parts) >= 2 and parts[0] == str(fp["size"]) and parts[-1] == fp["sha256"]


def stage_key(name: str, code_version: int, config: dict, inputs: dict) -> str:
    blob = json.dumps([name, code_version, config, inputs], sort_keys=True, default=_json_default)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- output identity
#
# An output is recorded with a cheap stamp (size and mtime of a file; count, bytes and a digest of
# every file's name, size and mtime for a directory) and its content hash. The stamp decides in
# the common case; when it differs but the sizes agree (a copy, rsync without -t, a tar without
# sub-second times), the content hash does, so a copied workspace keeps every unchanged stage and
# one changed byte still counts.


def _dir_files(p: Path) -> list[tuple[str, os.stat_result]]:
    found = []
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            found.append((os.path.relpath(full, p).replace(os.sep, "/"), os.stat(full)))
    return found


def output_stats(root: Path, rel: str, *, content: bool = True) -> dict | None:
    """The identity of an output: its stamp and, with ``content``, its content hash."""
    p = root / rel
    if p.is_file():
        st = p.stat()
        out = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if content:
            out["sha256"] = file_sha256(p)
        return out
    if p.is_dir():
        files = _dir_files(p)
        stamp = hashlib.sha1()
        for name, st in files:
            stamp.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        out = {"files": len(files), "bytes": sum(st.st_size for _, st in files), "stamp": stamp.hexdigest()}
        if content:
            out["sha256"] = _dir_sha256(p, [name for name, _ in files])
        return out
    return None


def _dir_sha256(p: Path, names: list[str]) -> str:
    h = hashlib.sha256()
    for name in names:
        h.update(f"{name}\0{file_sha256(p / name)}\n".encode())
    return h.hexdigest()


_SIZE_FIELDS = ("size", "files", "bytes")
_STAMP_FIELDS = ("mtime_ns", "stamp")


def check_output(root: Path, rel: str, recorded: dict) -> tuple[str, dict | None]:
    """``("same", None)``, ``("restamped", stamp)`` when only the stamp moved (the content is the
    recorded one: the new stamp to record), ``("changed", None)`` or ``("removed", None)``."""
    now = output_stats(root, rel, content=False)
    if now is None:
        return "removed", None
    if any(recorded.get(k) != now.get(k) for k in _SIZE_FIELDS if k in recorded or k in now):
        return "changed", None
    if all(recorded.get(k) == now.get(k) for k in _STAMP_FIELDS if k in recorded or k in now):
        return "same", None
    if "sha256" not in recorded:
        # written before content hashes were recorded: the sizes agree and that is all we know;
        # trusting them keeps a copied older workspace instead of redoing all of it
        return "same", None
    full = output_stats(root, rel, content=True)
    if full["sha256"] != recorded["sha256"]:
        return "changed", None
    return "restamped", {k: now[k] for k in _STAMP_FIELDS if k in now}


# --------------------------------------------------------------------------- the workspace


def _manifest_data(data: Any) -> dict:
    if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
        raise ValueError("not a talkcli manifest")
    data.setdefault("stages", {})
    return data


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]



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
            if self.is_workspace():
                self.status(restamp=True)  # a copied workspace is verified (hashed) once, here
            yield self
        finally:
            # the flock is the lock; a holder note left on a file system that turned read-only
            # names nobody once the lock is free
            with contextlib.suppress(OSError):
                os.unlink(holder)
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
        for dirpath, _, filenames in os.walk(self.root):
            for name in filenames:
                if name.startswith(".") and ".tmp" in name and (_TMP_NAME.match(name) or _OLD_TMP.match(name)):
                    _unlink_quiet(Path(dirpath) / name)

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

    @property
    def backup_path(self) -> Path:
        return self.root / MANIFEST_BACKUP

    def manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"format": MANIFEST_FORMAT, "source": None, "stages": {}}
        try:
            return _manifest_data(read_json(self.manifest_path))
        except (OSError, ValueError) as exc:
            damage = exc
        # every write keeps a second copy: a manifest damaged by hand, a disk error or a bad copy
        # costs nothing finished
        try:
            data = _manifest_data(read_json(self.backup_path))
        except (OSError, ValueError):
            raise TalkError(f"the workspace manifest {self.manifest_path} is damaged ({_first_line(damage)}) and "
                            f"has no intact backup; move it away and rerun `talk preprocess VIDEO -w {self.root}` "
                            "(every stage is redone)") from damage
        from .progress import warn

        warn(f"{self.manifest_path} is damaged ({_first_line(damage)}); using its backup {self.backup_path.name}")
        with contextlib.suppress(TalkError):
            write_json(self.manifest_path, data)
        return data

    def _write_manifest(self, data: dict) -> None:
        data["format"] = MANIFEST_FORMAT
        data["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        write_json(self.manifest_path, data)
        write_json(self.backup_path, data)

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

    def find_source(self) -> tuple[dict | None, dict | None]:
        """The recorded source fingerprint and the file's fingerprint now: at its recorded path,
        else at the same place relative to the workspace (the two moved together); None for the
        second when neither is there."""
        source = self.manifest().get("source")
        if not source:
            return None, None
        candidates = [Path(source["path"])]
        if source.get("relpath"):
            candidates.append(self.root / source["relpath"])
        for cand in candidates:
            try:
                same_place = str(cand.resolve()) == source["path"]
                return source, source_fingerprint(cand, previous=source if same_place else None, workspace=self.root)
            except OSError:
                continue
        return source, None

    def _check_outputs(self, rec: dict, restamps: dict) -> tuple[str, str] | None:
        """None when every output of ``rec`` is the recorded one, else (state, reason)."""
        for rel, stats in rec.get("outputs", {}).items():
            verdict, stamp = check_output(self.root, rel, stats)
            if verdict == "removed":
                return "missing", f"output removed: {rel}"
            if verdict == "changed":
                return "stale", f"output changed: {rel}"
            if verdict == "restamped":
                restamps.setdefault(rec["name"], {})[rel] = stamp
        return None

    def status(self, *, restamp: bool = False) -> list[StageStatus]:
        """Every stage's state. With ``restamp`` (the caller holds the lock) the stamps of outputs
        whose content was verified unchanged are recorded, so a copied workspace is hashed once."""
        data = self.manifest()
        stages = data["stages"]
        source, source_now = self.find_source()
        restamps: dict[str, dict] = {}
        result: dict[str, StageStatus] = {}
        for name, deps in STAGES.items():
            rec = stages.get(name)
            if rec is None:
                result[name] = StageStatus(name, "missing", "not run", None)
                continue
            broken = self._check_outputs(rec, restamps)
            if broken:
                result[name] = StageStatus(name, broken[0], broken[1], rec)
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
            note = ""
            if not deps and "source" in rec["inputs"]:
                if source_now is None:
                    # the outputs are all a later stage needs: a workspace moved without its video
                    # keeps its work (preprocess given the video again checks it)
                    note = "source video not found; its outputs are kept"
                elif not same_source(rec["inputs"]["source"], source_now):
                    reason = "source file changed"
            if reason:
                result[name] = StageStatus(name, "stale", reason, rec)
            else:
                result[name] = StageStatus(name, "done", note, rec)
        # Records of stages this version does not know (written by a newer talkcli) are shown too.
        for name, rec in stages.items():
            if name not in result:
                result[name] = StageStatus(name, "done", "unknown stage", rec)
        if restamp:
            self._restamp(restamps, source, source_now)
        return list(result.values())

    def _restamp(self, restamps: dict, source: dict | None, source_now: dict | None) -> None:
        moved = source_now is not None and source_now != source and source_now["sha256"] == source["sha256"]
        if not restamps and not moved:
            return
        data = self.manifest()
        for name, outs in restamps.items():
            for rel, stamp in outs.items():
                data["stages"][name]["outputs"][rel].update(stamp)
        if moved:
            data["source"] = source_now
        try:
            self._write_manifest(data)
        except StorageError:  # a read-only copy: verified again next time
            pass


# --------------------------------------------------------------------------- running a stage


def _source_input(rec: dict | None, given: dict | str) -> str:
    """The key a stage records for its source: the recorded one while the content is the same
    (whatever its path, mtime or key format), so a copied source or workspace is not redone."""
    if isinstance(given, str):
        parts = given.split(":")
        given = {"size": parts[0], "sha256": parts[-1]}
    recorded = (rec or {}).get("inputs", {}).get("source")
    if recorded and same_source(recorded, given):
        return recorded
    return fingerprint_key(given)


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
    ``output_key`` (or ``source`` to the source fingerprint: compared by content).
    """
    rec = ws.record(name)
    if "source" in inputs:
        inputs = {**inputs, "source": _source_input(rec, inputs["source"])}
    key = stage_key(name, code_version, config, inputs)
    if (
        not force
        and rec is not None
        and rec.get("key") == key
        and "output_key" in rec  # records written before output keys existed are redone
        and ws._check_outputs(rec, {}) is None
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
    "check_output",
    "file_sha256",
    "fingerprint_key",
    "output_stats",
    "read_json",
    "run_stage",
    "same_source",
    "source_fingerprint",
    "stage_key",
    "write_json",
    "write_torch",
]

"""What a copied workspace costs to check: `talk status` on a workspace, on a copy of it with new
mtimes (every output hashed once, the new stamps recorded), and on that copy again.

    .venv/bin/python bench/workspace_copy.py WORKSPACE

Prints one JSON line: the workspace's size and file count, and the seconds of each status (the
in-process call of what `talk status` runs, best of 3 where it repeats).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from talkcli.workspace import Workspace


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def status_of(ws: Workspace, restamp: bool) -> list:
    if restamp:
        with ws.locked("bench"):  # takes the lock: verifies and records the new stamps
            return ws.status()
    return ws.status()


def main() -> None:
    src = Path(sys.argv[1]).resolve()
    files = [p for p in src.rglob("*") if p.is_file()]
    out = {"workspace": str(src), "files": len(files), "mib": round(sum(p.stat().st_size for p in files) / 2**20, 1)}
    out["status_s"] = round(min(timed(lambda: Workspace(src).status()) for _ in range(3)), 3)
    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        copy = Path(tmp) / src.name
        shutil.copytree(src, copy, copy_function=shutil.copyfile)
        later = time.time_ns() + 10**9
        for p in [copy, *copy.rglob("*")]:
            os.utime(p, ns=(later, later))
        ws = Workspace(copy)
        out["copy_status_read_only_s"] = round(timed(lambda: ws.status()), 3)  # hashes, records nothing
        rows = []
        out["copy_first_locked_status_s"] = round(timed(lambda: rows.extend(status_of(ws, True))), 3)
        out["copy_status_after_s"] = round(min(timed(lambda: ws.status()) for _ in range(3)), 3)
        out["copy_states"] = sorted({r.state for r in rows})
    print(json.dumps(out))


if __name__ == "__main__":
    main()

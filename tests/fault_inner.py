"""Run inside ``unshare -rm`` by test_faults.py: a talk command on a private tmpfs whose disk fills
up, or turns read-only, part-way through; then the same command again once the fault is gone.

    python fault_inner.py SPEC.json

SPEC: {"mount": dir, "size_mb": n, "seed_dirs": {name: path to copy into the tmpfs},
       "fault": "full" | "readonly", "trigger": relative path that appears mid-stage | null,
       "delay": seconds after the trigger, "argv": [talk arguments, "{mnt}" replaced], "result": file}
Writes a JSON result: the faulty run's exit code / stderr, the workspace's state after it, and
the rerun's exit code / stderr / state.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True)


def state(ws: Path) -> dict:
    from talkcli.workspace import Workspace

    left = sorted(str(p.relative_to(ws)) for p in ws.rglob("*") if ".tmp" in p.name)
    return {"leftovers": left,
            "status": {r.name: [r.state, r.reason] for r in Workspace(ws).status()}}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    mnt = Path(spec["mount"])
    done = sh("mount", "-t", "tmpfs", "-o", f"size={spec['size_mb']}m", "none", str(mnt))
    if done.returncode:
        raise SystemExit(f"mount failed: {done.stderr}")
    for name, src in spec["seed_dirs"].items():
        shutil.copytree(src, mnt / name, symlinks=True)
    argv = [a.replace("{mnt}", str(mnt)) for a in spec["argv"]]
    cmd = [sys.executable, "-m", "talkcli.cli", "--quiet", *argv]
    ws = mnt / spec["workspace"]

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    trigger = mnt / spec["trigger"] if spec.get("trigger") else None
    t0 = time.time()
    while trigger is not None and not trigger.exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    time.sleep(spec.get("delay", 0))
    fault_at = time.time() - t0
    if spec["fault"] == "full":
        with open(mnt / "fill", "wb", buffering=0) as fh:  # take every free block
            for chunk in (1 << 20, 4096):
                try:
                    while True:
                        fh.write(b"\0" * chunk)
                except OSError:
                    pass
    else:  # read-only: the kernel refuses the remount while a file is open for writing (an MP4 being
        # encoded, say), so retry between writes
        while sh("mount", "-o", "remount,ro", str(mnt)).returncode and proc.poll() is None:
            time.sleep(0.01)
    alive = proc.poll() is None  # the fault is in place and the command still runs
    out, err = proc.communicate(timeout=600)
    first = {"returncode": proc.returncode, "stdout": out, "stderr": err, "fault_at": round(fault_at, 2),
             "running_at_fault": alive, **state(ws)}

    if spec["fault"] == "full":
        os.unlink(mnt / "fill")
    else:
        sh("mount", "-o", "remount,rw", str(mnt))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    result = {"fault": first, "rerun": {"returncode": again.returncode, "stdout": again.stdout,
                                        "stderr": again.stderr, **state(ws)}}
    Path(spec["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()

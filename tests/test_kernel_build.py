"""The kernel build cache: a killed build, a stale torch ``lock`` baton or a build running in
another process never leaves a later load waiting silently, and two kernel source locations
never share a build directory.

The builds run in subprocesses with a temporary ``TALKCLI_KERNEL_CACHE`` and
``TALKCLI_KERNEL_ONLY=knn`` (a one-op module, the smallest real build; about 1.5 min on 2
busy cores), and that one build serves every test here."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from talkcli.ops import _native

REPO = Path(__file__).resolve().parents[1]

LOAD = "from talkcli.ops import _native; _native.load('cpu')"
# what the CLI does with a NotAvailable: one line on stderr and the exit code
LOAD_ONE_LINE = ("import sys\nfrom talkcli.errors import NotAvailable\nfrom talkcli.ops import _native\n"
                 "try:\n    _native.load('cpu')\nexcept NotAvailable as exc:\n"
                 "    print(f'error: {exc}', file=sys.stderr)\n    sys.exit(exc.exit_code)\n")
WORKS = ("import torch\nfrom talkcli.ops import knn, use_backend\n"
         "p, v = torch.rand(50, 3, dtype=torch.float64), torch.rand(40, 3, dtype=torch.float64)\n"
         "with use_backend('native'):\n    got = knn.knn_brute(p, v, 3)\n"
         "with use_backend('reference'):\n    ref = knn.knn_brute(p, v, 3)\n"
         "assert torch.equal(got[0], ref[0]) and torch.allclose(got[1], ref[1])\nprint('knn ok')\n")
TIMEOUT = 300  # a one-op build takes 1-2 minutes here; the bug this guards against waits forever

pytestmark = pytest.mark.skipif(_native._compiler() is None or not _native._ensure_ninja(),
                                reason="no C++ compiler or ninja to build the kernels")


def env_for(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TALKCLI_KERNELS_VERBOSE", "TALKCLI_KERNEL_LOCK_TIMEOUT")}
    env.update(TALKCLI_KERNEL_CACHE=str(cache), TALKCLI_KERNEL_ONLY="knn", PYTHONPATH=str(REPO), **extra)
    return env


def run(code: str, cache: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env_for(cache, **extra), cwd=REPO, capture_output=True,
                          text=True, timeout=TIMEOUT)


def the_build_dir(cache: Path) -> Path:
    (d,) = [p for p in cache.iterdir() if p.is_dir()]
    return d


def wait_for(cond, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def killed_build(tmp_path_factory) -> dict:
    """The issue's scenario: the first build is killed (-9, with its compiler) mid-compile, then
    the next load runs. Its result and cache are shared by the tests of this module."""
    cache = tmp_path_factory.mktemp("kernel-cache")
    first = subprocess.Popen([sys.executable, "-c", LOAD], env=env_for(cache), cwd=REPO, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # build.ninja is written under torch's baton just before ninja starts the compiler
        wait_for(lambda: any(cache.glob("*/build.ninja")), "the first build to start")
        time.sleep(3)
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already: the assertions below say why
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    build_dir = the_build_dir(cache)
    left = {"baton": (build_dir / "lock").exists(), "so": any(build_dir.glob("*.so"))}
    t0 = time.monotonic()
    second = run(LOAD, cache)
    return dict(cache=cache, build_dir=build_dir, left=left, second=second, seconds=time.monotonic() - t0)


def test_load_after_a_killed_first_build_rebuilds(killed_build):
    assert killed_build["left"] == {"baton": True, "so": False}, "the kill did not land during the compile"
    second = killed_build["second"]
    assert second.returncode == 0, second.stderr
    assert "removing" in second.stderr and "lock left by an interrupted kernel build" in second.stderr
    assert not (killed_build["build_dir"] / "lock").exists()
    done = run(WORKS, killed_build["cache"])
    assert done.returncode == 0 and "knn ok" in done.stdout, done.stderr


def test_stale_baton_in_an_up_to_date_build_is_removed(killed_build):
    # torch waits on its baton even when there is nothing to build
    baton = killed_build["build_dir"] / "lock"
    baton.touch()
    done = run(LOAD, killed_build["cache"])
    assert done.returncode == 0, done.stderr
    assert f"warning: removing {baton} left by an interrupted kernel build" in done.stderr
    assert "building" not in done.stderr and not baton.exists()


@contextlib.contextmanager
def held_lock(build_dir: Path) -> Iterator[subprocess.Popen]:
    """A live process holding the build lock (as a talk process does while it builds) until the
    block ends."""
    code = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nos.ftruncate(fd, 0); os.write(fd, b'%d\\n' % os.getpid())\n"
            "print('held', flush=True)\nsys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(build_dir / _native.LOCK_NAME)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_held_lock_names_the_holder_and_gives_up_in_one_line(killed_build):
    build_dir = killed_build["build_dir"]
    with held_lock(build_dir) as holder:
        done = run(LOAD_ONE_LINE, killed_build["cache"], TALKCLI_KERNEL_LOCK_TIMEOUT="1")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert f"waiting for another talk process (pid {holder.pid}) that is building the kernels in {build_dir}" in lines
    assert lines[-1].startswith(f"error: gave up after 1 s waiting for another talk process (pid {holder.pid})")
    assert lines[-1].endswith(f"remove {build_dir / _native.LOCK_NAME} if it is hung")


def test_waiting_loader_goes_on_when_the_holder_finishes(killed_build, tmp_path):
    build_dir, err = killed_build["build_dir"], tmp_path / "stderr"
    with held_lock(build_dir) as holder, err.open("w") as sink:
        waiter = subprocess.Popen([sys.executable, "-c", LOAD], env=env_for(killed_build["cache"]), cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=sink)
        try:
            wait_for(lambda: "waiting for another talk process" in err.read_text(), "the waiting message")
            assert waiter.poll() is None
        except BaseException:
            waiter.kill()
            raise
    assert waiter.wait(timeout=TIMEOUT) == 0, err.read_text()
    assert err.read_text().count(f"(pid {holder.pid})") == 1  # said once, not once per poll


def test_build_dir_depends_on_the_source_location(tmp_path, monkeypatch):
    a, b = tmp_path / "a" / "kernels", tmp_path / "b" / "kernels"
    shutil.copytree(_native.kernel_dir(), a)
    shutil.copytree(_native.kernel_dir(), b)
    (tmp_path / "link").symlink_to(a)
    dirs = {}
    for name, where in (("a", a), ("b", b), ("link", tmp_path / "link")):
        monkeypatch.setattr(_native, "kernel_dir", lambda where=where: where)
        dirs[name] = _native.build_dir("cpu")
    assert dirs["a"] != dirs["b"]
    assert dirs["link"] == dirs["a"]  # the same sources reached another way share the build
    assert dirs["a"].parent == _native.cache_root()
    assert dirs["a"].name.startswith(_native._machine_tag("cpu") + "-src")


def test_status_looks_where_the_build_is(killed_build, monkeypatch):
    monkeypatch.setenv("TALKCLI_KERNEL_CACHE", str(killed_build["cache"]))
    monkeypatch.setenv("TALKCLI_KERNEL_ONLY", "knn")
    monkeypatch.setattr(_native, "_loaded", {})
    monkeypatch.setattr(_native, "_failed", {})
    assert _native.build_dir("cpu") == killed_build["build_dir"]
    assert _native.status()["cpu"] == "built"

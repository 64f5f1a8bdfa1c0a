"""Building, loading and choosing the native kernels.

One extension per device kind: ``talkcli_kernels_cpu`` (``kernels/bind/module.cpp`` +
``kernels/cpu/*.cpp``, C++17 with OpenMP) and, on a machine whose torch sees a GPU,
``talkcli_kernels_cuda`` (the same plus ``kernels/cuda/*.cu``; it serves CPU tensors too). They
are compiled by ``torch.utils.cpp_extension`` on first use into a cache directory per machine, torch,
python and kernel source location (built under a lock that a killed build cannot leave stale);
ninja rebuilds only what changed.

The backend setting picks what the ops use:
- ``auto`` (default): native when it builds, otherwise the PyTorch reference with one warning;
- ``native``: native or a clear error (benchmarks, or to make sure the fast path is used);
- ``reference``: always the pure-PyTorch reference (the spec; slow).
It comes from ``TALKCLI_KERNELS`` or ``use_backend()``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import torch

from ..errors import NotAvailable

BACKENDS = ("auto", "native", "reference")
_backend: str | None = None
_lock = threading.Lock()
_loaded: dict[str, object] = {}
_failed: dict[str, str] = {}
_warned = False


def kernel_dir() -> Path:
    """The kernel sources: shipped inside the package (wheel) or the repository's ``kernels/``."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "_kernels", here.parent.parent / "kernels"):
        if (cand / "common.h").is_file():
            return cand
    raise NotAvailable("the native kernel sources are missing from this installation; "
                       "set TALKCLI_KERNELS=reference to use the PyTorch reference")


def backend() -> str:
    value = _backend or os.environ.get("TALKCLI_KERNELS", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise NotAvailable(f"TALKCLI_KERNELS={value!r}: choose one of {', '.join(BACKENDS)}")
    return value


def set_backend(value: str | None) -> None:
    """Set the backend for this process (None: back to TALKCLI_KERNELS / auto)."""
    global _backend
    if value is not None and value not in BACKENDS:
        raise NotAvailable(f"kernel backend {value!r}: choose one of {', '.join(BACKENDS)}")
    _backend = value


@contextlib.contextmanager
def use_backend(value: str) -> Iterator[None]:
    previous = _backend
    set_backend(value)
    try:
        yield
    finally:
        set_backend(previous)


def cache_root() -> Path:
    if env := os.environ.get("TALKCLI_KERNEL_CACHE"):
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "talkcli" / "kernels"


def _machine_tag(kind: str) -> str:
    # -march=native code must not be shared between different CPUs, nor builds between torch versions.
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        cpu += "".join(lines)
    except OSError:
        pass
    digest = hashlib.sha1(f"{cpu}|{platform.machine()}".encode()).hexdigest()[:10]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return f"{kind}-torch{torch.__version__.replace('+', '_')}-{py}-{digest}"


def build_dir(kind: str) -> Path:
    """Where ``kind``'s extension is built: per machine, torch, python and kernel source location
    (ninja's build file names the sources' paths, so two checkouts sharing one directory would
    rebuild each other's kernels on every switch)."""
    src = hashlib.sha1(str(kernel_dir().resolve()).encode()).hexdigest()[:8]
    only = _only()
    return cache_root() / f"{_machine_tag(kind)}-src{src}{f'_{only}' if only else ''}"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _ensure_ninja() -> bool:
    """cpp_extension needs ninja on PATH; the ninja wheel installs it next to the interpreter,
    which is not on PATH when ``.venv/bin/talk`` is run without activating the venv."""
    if shutil.which("ninja"):
        return True
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # type: ignore

        dirs.insert(0, ninja.BIN_DIR)
    except Exception:
        pass
    for d in dirs:
        if os.path.isfile(os.path.join(d, "ninja")):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return True
    return False


def _only() -> str | None:
    """TALKCLI_KERNEL_ONLY=<op>: build a module with that op alone (developing one op while
    another is half-edited); it gets its own name and build directory."""
    return os.environ.get("TALKCLI_KERNEL_ONLY") or None


def sources(kind: str) -> list[Path]:
    root = kernel_dir()
    only = _only()
    cpu = sorted((root / "cpu").glob(f"{only}.cpp" if only else "*.cpp"))
    files = [root / "bind" / "module.cpp", *cpu]
    if kind == "cuda":
        files += sorted((root / "cuda").glob(f"{only}.cu" if only else "*.cu"))
    return files


def cpu_flags() -> list[str]:
    # GCC 12's IPA mod/ref pass dropped the hash grid's gradient stores for some instantiations
    # (zeros returned; kernels/cpu/hashgrid.cpp); off where the compiler has it
    extra = ["-fno-ipa-modref"] if _accepts_flag("-fno-ipa-modref") else []
    return ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-Wno-unknown-pragmas", *extra]


@functools.lru_cache(maxsize=None)
def _accepts_flag(flag: str) -> bool:
    cxx = _compiler()
    if cxx is None:
        return False
    try:
        done = subprocess.run([cxx, flag, "-Werror", "-x", "c++", "-fsyntax-only", "-"], input=b"int x;\n",
                              capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


LOCK_NAME = ".talkcli-build.lock"


def _lock_timeout() -> float:
    value = os.environ.get("TALKCLI_KERNEL_LOCK_TIMEOUT", "900")
    try:
        return float(value)
    except ValueError:
        raise NotAvailable(f"TALKCLI_KERNEL_LOCK_TIMEOUT={value!r}: give a number of seconds") from None


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(fd: int) -> str:
    pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return f"another talk process (pid {pid})" if pid.isdigit() else "another talk process"


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory/.talkcli-build.lock`` (flock) while torch builds and loads the extension.

    The kernel drops an flock when its process dies, so unlike torch's own ``lock`` baton file
    (created with O_EXCL, waited on forever, left behind by a killed build) it is never stale.
    The holder writes its pid into the file so that a waiter can name it."""
    from ..progress import info, warn

    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            timeout, who = _lock_timeout(), _holder(fd)
            info(f"waiting for {who} that is building the kernels in {directory}")
            deadline = time.monotonic() + timeout
            while not _try_lock(fd):
                if time.monotonic() > deadline:
                    raise NotAvailable(f"gave up after {timeout:g} s waiting for {who} that is building the kernels "
                                       f"in {directory}; stop it, or remove {path} if it is hung")
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        # every talkcli build runs under this flock, so a baton found now was left by a killed one
        baton = directory / "lock"
        if baton.exists():
            warn(f"removing {baton} left by an interrupted kernel build")
            baton.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # releases the flock


def _build(kind: str):
    from ..progress import info
    from torch.utils import cpp_extension

    if _compiler() is None:
        raise NotAvailable("no C++ compiler found (install g++ or set CXX)")
    if not _ensure_ninja():
        raise NotAvailable("ninja is not installed (pip install ninja)")
    if kind == "cuda" and cpp_extension.CUDA_HOME is None:
        raise NotAvailable("CUDA toolkit (nvcc) not found: set CUDA_HOME")
    only = _only()
    suffix = f"_{only}" if only else ""
    directory = build_dir(kind)
    directory.mkdir(parents=True, exist_ok=True)
    root = kernel_dir()
    kwargs = dict(
        name=f"talkcli_kernels_{kind}{suffix}",
        sources=[str(p) for p in sources(kind)],
        extra_include_paths=[str(root)],
        extra_cflags=cpu_flags() + (["-DTALKCLI_WITH_CUDA"] if kind == "cuda" else [])
        + (["-DTK_ONLY", f"-DTK_ONLY_{only.upper()}"] if only else []),
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=os.environ.get("TALKCLI_KERNELS_VERBOSE") == "1",
    )
    if kind == "cuda":
        kwargs["extra_cuda_cflags"] = ["-O3", "-DTALKCLI_WITH_CUDA", "--expt-relaxed-constexpr"]
    with _build_lock(directory):
        if not any(directory.glob("*.so")):  # later runs only check that the build is up to date
            info(f"native kernels: building {kind} extension (first use only, about a minute) in {directory}")
        return cpp_extension.load(**kwargs)


def load(kind: str = "cpu"):
    """The built extension for ``kind`` ('cpu' or 'cuda'); raises NotAvailable with the reason."""
    with _lock:
        if kind in _loaded:
            return _loaded[kind]
        if kind in _failed:
            raise NotAvailable(_failed[kind])
        try:
            mod = _build(kind)
        except NotAvailable as exc:
            _failed[kind] = str(exc)
            raise
        except Exception as exc:  # compiler errors: keep the first line that says what failed
            detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            _failed[kind] = f"building the native {kind} kernels failed: {detail}"
            raise NotAvailable(_failed[kind]) from exc
        _loaded[kind] = mod
        return mod


def extension_for(*tensors: torch.Tensor):
    """The extension to run an op on these tensors, or None for the PyTorch reference."""
    global _warned
    choice = backend()
    if choice == "reference":
        return None
    kind = "cuda" if any(t.is_cuda for t in tensors) else "cpu"
    if kind == "cpu" and "cuda" in _loaded:
        return _loaded["cuda"]
    try:
        return load(kind)
    except NotAvailable as exc:
        if choice == "native":
            raise
        if not _warned:
            from ..progress import warn

            warn(f"{exc}; using the PyTorch reference kernels (much slower)")
            _warned = True
        return None


def status() -> dict:
    """What ``talk info`` reports: compiler, nvcc, and whether each extension is built/loaded."""
    from torch.utils import cpp_extension

    out = {"backend": backend(), "cxx": _compiler(), "nvcc": shutil.which("nvcc") or (
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None)}
    for kind in ("cpu", "cuda"):
        try:
            lib = build_dir(kind)  # the directory _build uses (TALKCLI_KERNEL_ONLY included)
        except NotAvailable as exc:  # the sources are missing
            out[kind] = str(exc)
            continue
        built = any(lib.glob(f"talkcli_kernels_{kind}*.so")) if lib.is_dir() else False
        out[kind] = "loaded" if kind in _loaded else ("built" if built else (_failed.get(kind) or "not built yet"))
    return out

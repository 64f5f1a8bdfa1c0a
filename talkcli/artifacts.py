"""Reading what ``talk`` wrote: workspace NPZ archives and torch model files.

A damaged or foreign file becomes one ``InputError`` that names it and the command that writes it
again, never an internal error. Model files are unpickled with ``weights_only=True``: tensors,
Python primitives and (for files of earlier versions, which held numpy arrays) numpy's array
reconstruction, nothing that can run code.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .errors import InputError

# what reading a truncated, overwritten or foreign NPZ raises, at np.load or when an array is read
NPZ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError, OSError)


def preprocess_again(root: Path) -> str:
    """The command that rewrites a workspace's preprocess outputs (``--force``: the record may
    still match a file damaged after it was written)."""
    from .workspace import Workspace

    try:
        video = (Workspace(root).manifest().get("source") or {}).get("path") or "VIDEO"
    except Exception:  # noqa: BLE001 - only for the message: the manifest may be what is broken
        video = "VIDEO"
    return f"talk preprocess {video} -w {root} --force"


class Npz:
    """A workspace NPZ, read lazily like ``np.load``'s NpzFile; damage found on opening it or on
    reading an array is an InputError that says to run ``rerun`` again."""

    def __init__(self, path: Path, rerun: str):
        self.path, self.rerun = Path(path), rerun
        if not self.path.is_file():
            raise InputError(f"{self.path} is missing; run `{rerun}`")
        try:
            self._npz = np.load(self.path, allow_pickle=False)
        except NPZ_ERRORS as exc:
            raise self._damaged(exc) from exc
        self.files = list(self._npz.files)

    def _damaged(self, why: Exception | str) -> InputError:
        why = why if isinstance(why, str) else type(why).__name__
        return InputError(f"{self.path} is damaged ({why}); run `{self.rerun}` again")

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.files:
            raise self._damaged(f"no array '{key}'")
        try:
            return self._npz[key]
        except NPZ_ERRORS as exc:
            raise self._damaged(exc) from exc


def workspace_npz(ws, rel: str) -> Npz:
    """A preprocess output of workspace ``ws`` (``facefit.npz``, ``landmarks.npz``, ...)."""
    return Npz(ws.path(rel), preprocess_again(ws.root))


# --------------------------------------------------------------------------- torch files


def _numpy_globals() -> list:
    """What unpickling a numpy array or scalar needs, under the names numpy 1 and 2 pickle them."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 1.26
        from numpy.core import multiarray
    allowed: list = [np.ndarray, np.dtype]
    # the class of each numeric dtype: unpickling a dtype sets its state, allowed only for these
    allowed += sorted({type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"}, key=lambda t: t.__name__)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    return allowed


def load_torch(path: Path, rerun: str):
    """``torch.load`` that never runs code; any failure says to run ``rerun`` again."""
    import torch

    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickles it then refuses: one line, ours
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found:  # weights_only refused a global: a pickle that would call it
            raise InputError(f"{path} is not a talkcli model: loading it would run {found.group(1)} (refused); "
                             f"run `{rerun}` again") from None
        raise InputError(f"{path} is damaged or not a talkcli model (UnpicklingError); run `{rerun}` again") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    except Exception as exc:  # noqa: BLE001 - truncated or overwritten: whatever torch's reader says
        raise InputError(f"{path} is damaged ({type(exc).__name__}); run `{rerun}` again") from None


def _map_leaves(obj, leaf):
    """``obj`` with ``leaf`` applied to everything inside its dicts, lists and tuples."""
    if isinstance(obj, dict):
        return {k: _map_leaves(v, leaf) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_leaves(v, leaf) for v in obj)
    return leaf(obj)


def to_saved(obj):
    """``obj`` with every numpy array a tensor and every numpy scalar a Python number, so that
    ``load_torch`` needs no numpy globals (``from_saved`` turns the tensors back)."""
    import torch

    def leaf(x):
        if isinstance(x, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(x))
        return x.item() if isinstance(x, np.generic) else x

    return _map_leaves(obj, leaf)


def from_saved(obj):
    """The inverse of ``to_saved``: tensors back to numpy arrays (numpy arrays of older files
    pass through)."""
    import torch

    return _map_leaves(obj, lambda x: x.numpy() if isinstance(x, torch.Tensor) else x)

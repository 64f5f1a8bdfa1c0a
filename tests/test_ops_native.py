"""The native-kernel build and the backend switch (the ops' own tests are in test_ops_*.py)."""

import pytest
import torch

from talkcli.errors import NotAvailable
from talkcli.ops import _native, use_backend

OPS = {  # one function per op that the full extension must expose
    "hashgrid": "hashgrid_forward",
    "hashgrid_batched": "hashgrid_batched_forward",
    "raymarch": "raymarch_march",
    "composite": "composite_forward",
    "knn": "knn_query",
}


def test_backend_setting(monkeypatch):
    monkeypatch.setenv("TALKCLI_KERNELS", "reference")
    assert _native.backend() == "reference"
    assert _native.extension_for(torch.zeros(1)) is None
    with use_backend("auto"):
        assert _native.backend() == "auto"
    assert _native.backend() == "reference"
    monkeypatch.setenv("TALKCLI_KERNELS", "fastest")
    with pytest.raises(NotAvailable, match="auto, native, reference"):
        _native.backend()


def test_no_compiler_falls_back_to_reference(monkeypatch, capsys):
    monkeypatch.setattr(_native, "_loaded", {})
    monkeypatch.setattr(_native, "_failed", {})
    monkeypatch.setattr(_native, "_warned", False)
    monkeypatch.setattr(_native, "_compiler", lambda: None)
    with use_backend("auto"):
        assert _native.extension_for(torch.zeros(1)) is None
    assert "no C++ compiler found" in capsys.readouterr().err
    with use_backend("native"), pytest.raises(NotAvailable, match="no C\\+\\+ compiler"):
        _native.extension_for(torch.zeros(1))


def test_full_extension_builds_with_every_op():
    try:
        ext = _native.load("cpu")
    except NotAvailable as exc:
        pytest.skip(str(exc))
    assert ext.with_cuda is False
    if _native._only():
        pytest.skip("TALKCLI_KERNEL_ONLY builds one op")
    missing = [op for op, fn in OPS.items() if not hasattr(ext, fn)]
    assert not missing, f"ops missing from the extension: {missing}"
    assert _native.status()["cpu"] == "loaded"

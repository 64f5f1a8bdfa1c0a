"""LPIPS from user-supplied files in the real layouts (synthetic weights made here)."""

from __future__ import annotations

import pytest
import torch

from talkcli.avatar.lpips import LPIPS, load_lpips

# torchvision AlexNet "features" conv layers (index: weight shape) and lpips' alex.pth linear layers
ALEX = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
LINS = (64, 192, 384, 256, 256)


def write_weights(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    alex = {}
    for i, shape in ALEX.items():
        alex[f"features.{i}.weight"] = torch.randn(shape, generator=g) * (2 / (shape[1] * shape[2] * shape[3])) ** 0.5
        alex[f"features.{i}.bias"] = torch.zeros(shape[0])
    alex["classifier.1.weight"] = torch.zeros(4, 4)  # present in the real file, unused
    torch.save(alex, d / "alexnet-owt-7be5be79.pth")
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(LINS)},
               d / "alex.pth")


def test_missing_weights_mean_no_lpips(tmp_path, monkeypatch):
    monkeypatch.setenv("TALKCLI_LPIPS", str(tmp_path / "nowhere"))
    assert load_lpips() is None


def test_lpips_from_files(tmp_path, monkeypatch):
    write_weights(tmp_path)
    monkeypatch.setenv("TALKCLI_LPIPS", str(tmp_path))
    net = load_lpips()
    assert isinstance(net, LPIPS)
    torch.testing.assert_close(net.convs[2].weight, torch.load(tmp_path / "alexnet-owt-7be5be79.pth")["features.6.weight"])
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 64, 64, generator=g)
    b = (a + 0.2 * torch.randn(2, 3, 64, 64, generator=g)).clamp(0, 1)
    assert torch.allclose(net(a, a), torch.zeros(2), atol=1e-6)
    d_small, d_big = net(a, (a + 0.02).clamp(0, 1)), net(a, b)
    assert (d_big > d_small).all() and (d_small > 0).all()
    x = a.clone().requires_grad_()
    net(x, b).sum().backward()
    assert x.grad.abs().sum() > 0


def test_wrong_files_are_a_clear_error(tmp_path, monkeypatch):
    from talkcli.errors import InputError

    torch.save({"something": torch.zeros(1)}, tmp_path / "alex.pth")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "alexnet-x.pth")
    monkeypatch.setenv("TALKCLI_LPIPS", str(tmp_path))
    with pytest.raises(InputError, match="not lpips' alex.pth"):
        load_lpips()

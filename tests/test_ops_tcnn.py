"""tiny-cuda-nn backend parity (runs only where tinycudann and a GPU are present)."""

import pytest
import torch

from talkcli.ops import tcnn_backend
from talkcli.ops.hashspec import HashGridSpec

pytestmark = pytest.mark.skipif(not tcnn_backend.available(), reason="tinycudann with a CUDA device not available")


@pytest.mark.parametrize("features", [2, 4])
def test_tcnn_hash_grid_equals_ours(features):
    from talkcli.ops.hashgrid import hash_encode_reference

    spec = HashGridSpec(dims=3, levels=8, features=features, log2_table=14, base_resolution=16,
                        finest_resolution=512)
    enc = tcnn_backend.TcnnHashGrid(spec).cuda()
    g = torch.Generator().manual_seed(0)
    table = (torch.rand(spec.n_entries, features, generator=g) - 0.5)
    enc.load_table(table.cuda())
    x = torch.rand(4099, 3, generator=g)
    ours = hash_encode_reference(x.double(), table.double(), spec).float()
    theirs = enc(x.cuda()).cpu()
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=1e-4)
    mask = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    masked = enc(x.cuda(), mask.cuda()).cpu()
    assert masked[:, 3 * features:].abs().max() == 0
    assert torch.allclose(masked[:, :3 * features], ours[:, :3 * features], atol=1e-5, rtol=1e-4)


def test_tcnn_mlp_equals_torch_mlp():
    mlp = tcnn_backend.TcnnMLP(32, 4, width=64, hidden_layers=2).cuda()
    x = torch.rand(1000, 32, device="cuda")
    mats = mlp.torch_weights()
    h = torch.nn.functional.pad(x, (0, mats[0].shape[1] - 32))
    for i, w in enumerate(mats):
        h = h @ w.t()
        if i < len(mats) - 1:
            h = torch.relu(h)
    # tcnn computes in half precision
    assert torch.allclose(mlp(x), h[:, :4], atol=2e-2, rtol=2e-2)

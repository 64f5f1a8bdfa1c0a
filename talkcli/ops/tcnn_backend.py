"""tiny-cuda-nn as an optional GPU backend for the hash grid and plain (unconditioned) MLPs.

tinycudann is not on PyPI; when it is importable and a GPU is present, ``HashGrid(spec,
backend="tcnn")`` style callers can use these wrappers. Our hash-grid geometry and table layout
(``hashspec``) are tiny-cuda-nn's, so a table copies over one to one (``TcnnHashGrid.load_table``)
and the parity test compares the two encodings on the same parameters.

The level mask has no tcnn counterpart: masked levels are multiplied by zero after the encoding,
which gives the same output and the same (zero) gradients for those levels.
"""

from __future__ import annotations

import torch
from torch import nn

from .hashspec import HashGridSpec


def available() -> bool:
    """tinycudann importable and a CUDA device to run it on."""
    if not torch.cuda.is_available():
        return False
    try:
        import tinycudann  # noqa: F401
    except Exception:
        return False
    return True


def _tcnn():
    try:
        import tinycudann as tcnn
    except Exception as exc:  # ImportError, or a CUDA/ABI mismatch at import
        from ..errors import NotAvailable

        raise NotAvailable(f"the tcnn backend needs tinycudann on a CUDA machine ({exc})") from exc
    return tcnn


def encoding_config(spec: HashGridSpec) -> dict:
    return {
        "otype": "HashGrid",
        "n_levels": spec.levels,
        "n_features_per_level": spec.features,
        "log2_hashmap_size": spec.log2_table,
        "base_resolution": spec.base_resolution,
        "per_level_scale": spec.per_level_scale,
        "interpolation": "Linear",
    }


class TcnnHashGrid(nn.Module):
    """The hash encoding by tiny-cuda-nn, float32 in and out, with our level mask."""

    def __init__(self, spec: HashGridSpec, seed: int = 1337):
        super().__init__()
        tcnn = _tcnn()
        self.spec = spec
        self.encoding = tcnn.Encoding(spec.dims, encoding_config(spec), seed=seed, dtype=torch.float32)
        n = self.encoding.params.numel()
        if n != spec.n_entries * spec.features:
            raise RuntimeError(f"tinycudann lays the table out with {n} parameters, ours has "
                               f"{spec.n_entries * spec.features}: versions disagree on the level sizes")

    @property
    def output_dim(self) -> int:
        return self.spec.output_dim

    @torch.no_grad()
    def load_table(self, table: torch.Tensor) -> None:
        """Copy our (n_entries, F) table into tcnn's flat parameters (same order)."""
        self.encoding.params.copy_(table.reshape(-1).to(self.encoding.params))

    def table(self) -> torch.Tensor:
        return self.encoding.params.view(self.spec.n_entries, self.spec.features)

    def forward(self, x: torch.Tensor, level_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.encoding(x.float()).float()
        if level_mask is not None:
            keep = level_mask.to(out.device, out.dtype).repeat_interleave(self.spec.features)
            out = out * keep
        return out


class TcnnMLP(nn.Module):
    """tiny-cuda-nn's fully fused MLP (ReLU hidden layers, no biases, width 16..128)."""

    def __init__(self, n_in: int, n_out: int, width: int, hidden_layers: int, output_activation: str = "None",
                 seed: int = 1337):
        super().__init__()
        tcnn = _tcnn()
        self.n_in, self.n_out, self.width, self.hidden_layers = n_in, n_out, width, hidden_layers
        self.net = tcnn.Network(n_in, n_out, {
            "otype": "FullyFusedMLP", "activation": "ReLU", "output_activation": output_activation,
            "n_neurons": width, "n_hidden_layers": hidden_layers}, seed=seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).float()

    def torch_weights(self) -> list[torch.Tensor]:
        """The layer matrices (out, in) as tcnn stores them: one after another, row-major, input
        and output widths padded to multiples of 16. Used to build the equivalent torch MLP."""
        pad = lambda n: (n + 15) // 16 * 16  # noqa: E731
        shapes = [(self.width, pad(self.n_in))] + [(self.width, self.width)] * (self.hidden_layers - 1) \
            + [(pad(self.n_out), self.width)]
        flat, mats, at = self.net.params.detach().float(), [], 0
        for rows, cols in shapes:
            mats.append(flat[at:at + rows * cols].view(rows, cols))
            at += rows * cols
        return mats

"""MLPs conditioned on a global code: M-AGLO (R2-Talker Sec. 3.3) or GLO concatenation.

M-AGLO: every hidden layer's pre-activation I_hat is modulated by an affine transform whose shift
alpha and scale beta come from a small FC of the condition, I = I_hat * (1 + beta) + alpha. The
condition is per frame; samples carry the index of their frame, so each layer computes (alpha,
beta) once per frame and gathers them per sample. GLO (the ablation's baseline) concatenates the
condition to the MLP's input instead.
"""

from __future__ import annotations

import torch
from torch import nn


class ConditionedMLP(nn.Module):
    """``in_dim -> hidden x layers -> out_dim`` with ReLU; the condition enters every hidden layer
    (``maglo``) or the input (``concat``)."""

    def __init__(self, in_dim: int, hidden: int, layers: int, out_dim: int, cond_dim: int, mode: str = "maglo"):
        super().__init__()
        self.mode = mode
        first = in_dim + (cond_dim if mode == "concat" else 0)
        dims = [first] + [hidden] * layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], out_dim)
        if mode == "maglo":
            # one FC per hidden layer: condition -> (alpha, beta); zero-initialised so that training
            # starts from the plain MLP (and M-AGLO with zero alpha/beta *is* the plain MLP)
            self.affine = nn.ModuleList(nn.Linear(cond_dim, 2 * hidden) for _ in range(layers))
            for fc in self.affine:
                nn.init.zeros_(fc.weight)
                nn.init.zeros_(fc.bias)

    def modulation(self, cond: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (alpha, beta), each (B, hidden), for conditions ``cond`` (B, cond_dim)."""
        if self.mode != "maglo":
            return []
        return [tuple(fc(cond).chunk(2, dim=-1)) for fc in self.affine]  # type: ignore[misc]

    def forward(self, x: torch.Tensor, cond: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (S, in_dim); ``cond`` (B, cond_dim) per frame; ``index`` (S,) frame of each sample
        (None: B must be 1 or S)."""
        if cond.shape[0] == 1:  # one frame (rendering): broadcast instead of a per-sample gather
            index = None
        if self.mode == "concat":
            c = cond if index is None else cond[index]
            h = torch.cat([x, c.expand(x.shape[0], -1)], dim=-1)
            for layer in self.hidden:
                h = torch.relu(layer(h))
            return self.out(h)
        h = x
        inplace = not torch.is_grad_enabled()  # inference: no temporaries per layer
        for layer, (alpha, beta) in zip(self.hidden, self.modulation(cond)):
            if index is not None:
                alpha, beta = alpha[index], beta[index]
            if inplace:
                h = layer(h).mul_(1 + beta).add_(alpha).relu_()
            else:
                h = torch.relu(torch.addcmul(alpha, layer(h), 1 + beta))
        return self.out(h)

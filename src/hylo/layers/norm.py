"""RMS norms as Qwen3.5 defines them: zero-centred weight (x·(1+w)) and the gated variant of GDN."""

from __future__ import annotations

import torch
from torch import nn

from hylo.distributed import TPGroup
from hylo.kernels import Ops
from hylo.layers.parts import Part


class RMSNorm(nn.Module):
    """Normalise in float32 and scale by (1 + weight), as the checkpoint stores weight around zero."""

    def __init__(self, name: str, dim: int, eps: float, ops: Ops):
        super().__init__()
        self.name = name
        self.eps = eps
        self.ops = ops
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def parts(self) -> list[Part]:
        return [Part(f"{self.name}.weight", self.weight)]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with a residual, (norm(x + residual), x + residual) in one pass."""
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class ResidualNorm(RMSNorm):
    """A norm of the residual stream. Its input is the previous layer's output as this rank's partial sum (row-parallel
    layers and the vocabulary-parallel embedding leave their outputs unreduced), so the ranks' sums, the residual add
    and the norm can run as one launch (`TPGroup.all_reduce_rms_norm`)."""

    def __init__(self, name: str, dim: int, eps: float, ops: Ops, tp: TPGroup):
        super().__init__(name, dim, eps, ops)
        self.tp = tp

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(Σ_ranks x + residual), Σ_ranks x + residual); without a residual the sum is the new residual."""
        return self.tp.all_reduce_rms_norm(x, self.weight, self.eps, residual, self.ops.rms_norm)


class GatedRMSNorm(RMSNorm):
    """GDN's output norm per value head: weight·norm(x) (weight stored as is), times silu(gate) in float32."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.ops.gated_rms_norm(x, gate, self.weight, self.eps)

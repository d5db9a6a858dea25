"""RMS norms as Qwen3.5 defines them: zero-centred weight (x·(1+w)) and the gated variant of GDN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hylo.layers.parts import Part


class RMSNorm(nn.Module):
    """Normalise in float32 and scale by (1 + weight), as the checkpoint stores weight around zero."""

    def __init__(self, name: str, dim: int, eps: float):
        super().__init__()
        self.name = name
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def parts(self) -> list[Part]:
        return [Part(f"{self.name}.weight", self.weight)]

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.normalized(x) * (1.0 + self.weight.float())).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """GDN's output norm per value head: weight·norm(x) (weight stored as is), times silu(gate) in float32."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        out = self.weight * self.normalized(x).to(x.dtype)
        return (out * F.silu(gate.float())).to(x.dtype)

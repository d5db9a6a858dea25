"""The gated SiLU MLP (dense layers and MoE's shared expert)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hylo.distributed import TPGroup
from hylo.layers.linear import ColumnLinear, Proj, RowLinear


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, tp: TPGroup, owner: str):
        super().__init__()
        self.gate_up = ColumnLinear(
            hidden, [Proj.plain("gate_proj", intermediate), Proj.plain("up_proj", intermediate)], tp, owner
        )
        self.down_proj = RowLinear(Proj.plain("down_proj", intermediate), hidden, tp, owner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(F.silu(gate) * up)

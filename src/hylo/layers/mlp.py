"""The gated SiLU MLP (dense layers and MoE's shared expert)."""

from __future__ import annotations

import torch
from torch import nn

from hylo.distributed import TPGroup
from hylo.kernels import Ops
from hylo.layers.linear import ColumnLinear, Proj, RowLinear


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, tp: TPGroup, ops: Ops, owner: str):
        super().__init__()
        self.ops = ops
        self.gate_up = ColumnLinear(
            hidden, [Proj.plain("gate_proj", intermediate), Proj.plain("up_proj", intermediate)], tp, owner
        )
        self.down_proj = RowLinear(Proj.plain("down_proj", intermediate), hidden, tp, owner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)  # views of one [tokens, 2·local] output (LoRA already added)
        return self.down_proj(self.ops.silu_mul(gate, up))

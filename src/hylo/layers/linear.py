"""Column- and row-parallel linear layers whose rows are declared as parts.

A column layer fuses several projections into one GEMM (GDN's qkv/z/b/a, MLP's gate/up); each
projection is declared once as a `Proj` and everything else (which checkpoint tensor goes where,
which rows a rank keeps) is derived from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hylo.distributed import TPGroup
from hylo.layers.lora import LoRALinear
from hylo.layers.parts import Block, Part, check_parts, local_total


ROW_ALIGN = 8  # a column layer's GEMM output rows: a multiple of this many (16 bytes in bfloat16)


@dataclass(frozen=True)
class Proj:
    """A projection as checkpoints and PEFT name it, with the blocks its output (or input) rows form."""

    name: str
    blocks: tuple[Block, ...]
    lora: bool = True  # whether adapters may target it

    @staticmethod
    def plain(name: str, size: int, unit: int = 1) -> Proj:
        return Proj(name, (Block(name, size, unit),))


class ColumnLinear(LoRALinear, nn.Module):
    """y = x·Wᵀ where W stacks this rank's rows of every projection; forward returns one tensor per projection."""

    def __init__(self, in_features: int, projs: list[Proj], tp: TPGroup, owner: str = ""):
        super().__init__()
        self.projs = projs
        self.tp = tp
        self.in_features = in_features
        self.local_sizes = [local_total(p.blocks, tp.size) for p in projs]
        rows = sum(self.local_sizes)
        # The weight's storage holds zero rows after it, up to a multiple of ROW_ALIGN, that no part declares (so loading
        # still checks every declared row): `base_linear` multiplies by them too (see there).
        self.weight = nn.Parameter(torch.zeros(_aligned(rows), in_features)[:rows], requires_grad=False)
        check_parts(self.parts(), tp.size, owner)

    def parts(self) -> list[Part]:
        out, offset = [], 0
        for proj, n in zip(self.projs, self.local_sizes):
            out.append(Part(f"{proj.name}.weight", self.weight, proj.blocks, 0, offset, module=proj.name, lora="module" if proj.lora else None))
            offset += n
        return out

    def base_linear(self, x: torch.Tensor) -> torch.Tensor:
        """The GEMM over the weight and its padding rows, its output cut back: cuBLAS's fast kernels need 16-byte aligned
        output rows, and MoE's 1,281-row router + shared-expert layer took an sm75 fallback, 488 µs for 8,192 tokens
        against 63 µs padded (one H200); at batch 64 its decode step was 10% slower. One token is a GEMV, which ran
        faster unpadded (17 against 20 µs)."""
        rows = self.weight.shape[0]
        if x.shape[0] == 1 or rows == _aligned(rows):
            return F.linear(x, self.weight)
        padded = self.weight.as_strided((_aligned(rows), self.in_features), self.weight.stride())
        return F.linear(x, padded)[:, :rows]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.lora_linear(x).split(self.local_sizes, dim=-1))


def _aligned(rows: int) -> int:
    return -(-rows // ROW_ALIGN) * ROW_ALIGN


class RowLinear(LoRALinear, nn.Module):
    """y = Σ_ranks x_local·W_localᵀ: the input is split by `proj.blocks`; forward returns this rank's partial sum, which
    the next norm of the residual stream reduces (`ResidualNorm`)."""

    def __init__(self, proj: Proj, out_features: int, tp: TPGroup, owner: str = ""):
        super().__init__()
        self.proj = proj
        self.tp = tp
        self.weight = nn.Parameter(
            torch.empty(out_features, local_total(proj.blocks, tp.size)), requires_grad=False
        )
        check_parts(self.parts(), tp.size, owner)

    def parts(self) -> list[Part]:
        return [Part(f"{self.proj.name}.weight", self.weight, self.proj.blocks, 1, module=self.proj.name, lora="module")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The LoRA delta of a row-parallel layer is a partial sum too: it joins the same all-reduce.
        return self.lora_linear(x)

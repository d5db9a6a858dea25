"""Gated DeltaNet (linear attention) over per-sequence state slots: a conv window and a recurrent matrix."""

from __future__ import annotations

import torch
from torch import nn

from hylo.batch import Batch
from hylo.distributed import TPGroup
from hylo.kernels import Ops
from hylo.layers.linear import ColumnLinear, Proj, RowLinear
from hylo.layers.norm import GatedRMSNorm
from hylo.layers.parts import Block, Part, check_parts, heads, local_total


class HeadwiseParams(nn.Module):
    """Tensors with one row (or channel) per head or per q/k/v channel, split like the heads they follow."""

    def __init__(self, shapes: dict[str, tuple[tuple[Block, ...], tuple[int, ...]]], tp: TPGroup, owner: str):
        super().__init__()
        self.blocks = {}
        for key, (blocks, trailing) in shapes.items():
            attr = key.replace(".", "_")
            param = nn.Parameter(torch.empty(local_total(blocks, tp.size), *trailing), requires_grad=False)
            self.register_parameter(attr, param)
            self.blocks[key] = (attr, blocks)
        check_parts(self.parts(), tp.size, owner)

    def parts(self) -> list[Part]:
        return [Part(key, getattr(self, attr), blocks, 0) for key, (attr, blocks) in self.blocks.items()]


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg, tp: TPGroup, ops: Ops, owner: str):
        super().__init__()
        num_k, num_v = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        if num_v % num_k:
            raise ValueError(f"{owner}linear_num_value_heads ({num_v}) must be a multiple of linear_num_key_heads ({num_k})")
        # in_proj_qkv is flat [q (all key heads) | k (all key heads) | v (all value heads)]: each block splits alone.
        qkv = (heads("q", num_k, dk), heads("k", num_k, dk), heads("v", num_v, dv))
        self.in_proj = ColumnLinear(
            cfg.hidden_size,
            [
                Proj("in_proj_qkv", qkv),
                Proj("in_proj_z", (heads("in_proj_z", num_v, dv),)),
                Proj("in_proj_b", (heads("in_proj_b", num_v, 1),)),
                Proj("in_proj_a", (heads("in_proj_a", num_v, 1),)),
            ],
            tp,
            owner,
        )
        per_head = (heads("heads", num_v, 1),)
        self.headwise = HeadwiseParams(
            {"conv1d.weight": (qkv, (1, cfg.linear_conv_kernel_dim)), "A_log": (per_head, ()), "dt_bias": (per_head, ())},
            tp,
            owner,
        )
        self.norm = GatedRMSNorm("norm", dv, cfg.rms_norm_eps, ops)
        self.out_proj = RowLinear(Proj("out_proj", (heads("out_proj", num_v, dv),)), cfg.hidden_size, tp, owner)
        self.key_dim = local_total(qkv[:1], tp.size)
        self.dk, self.dv = dk, dv
        self.ops = ops

    def forward(self, x: torch.Tensor, batch: Batch, conv_states: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        qkv, z, b, a = self.in_proj(x)
        conv_weight = self.headwise.conv1d_weight[:, 0, :]  # [channels, kernel]
        qkv = self.ops.causal_conv1d(qkv, conv_weight, conv_states, batch)
        q, k, v = qkv.split([self.key_dim, self.key_dim, qkv.shape[1] - 2 * self.key_dim], dim=-1)
        out = self.ops.gated_delta_rule(
            q.view(tokens, -1, self.dk), k.view(tokens, -1, self.dk), v.view(tokens, -1, self.dv), a, b,
            self.headwise.A_log, self.headwise.dt_bias, states, batch,
        )  # [tokens, value heads, dv]
        out = self.norm(out, z.view(tokens, -1, self.dv))
        return self.out_proj(out.reshape(tokens, -1))

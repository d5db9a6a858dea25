"""Qwen3.5's gated full attention over the paged KV cache."""

from __future__ import annotations

import torch
from torch import nn

from hylo.batch import Batch
from hylo.distributed import TPGroup
from hylo.kernels import Ops
from hylo.layers.linear import ColumnLinear, Proj, RowLinear
from hylo.layers.norm import RMSNorm
from hylo.layers.parts import Block, heads
from hylo.layers.rotary import Rotary


class GatedAttention(nn.Module):
    """q_proj yields, per head, [query | gate] (2·head_dim rows), so it splits across ranks by whole heads
    of 2·head_dim; KV heads split, or are replicated when there are fewer KV heads than ranks."""

    def __init__(self, cfg, tp: TPGroup, ops: Ops, owner: str):
        super().__init__()
        self.head_dim = d = cfg.head_dim
        num_q, num_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.qkv = ColumnLinear(
            cfg.hidden_size,
            [
                Proj("q_proj", (Block("q_proj", num_q * 2 * d, unit=2 * d),)),
                Proj("k_proj", (heads("k_proj", num_kv, d, replicable=True),)),
                Proj("v_proj", (heads("v_proj", num_kv, d, replicable=True),)),
            ],
            tp,
            owner,
        )
        self.o_proj = RowLinear(Proj("o_proj", (heads("o_proj", num_q, d),)), cfg.hidden_size, tp, owner)
        self.q_norm = RMSNorm("q_norm", d, cfg.rms_norm_eps, ops)
        self.k_norm = RMSNorm("k_norm", d, cfg.rms_norm_eps, ops)
        rope = cfg.rope_parameters
        self.rotary = Rotary(d, rope.get("partial_rotary_factor", 1.0), rope["rope_theta"])
        self.ops = ops
        self.scale = d**-0.5

    def forward(self, x: torch.Tensor, batch: Batch, kv_cache: torch.Tensor) -> torch.Tensor:
        tokens, d = x.shape[0], self.head_dim
        query_gate, k, v = self.qkv(x)
        query_gate = query_gate.view(tokens, -1, 2 * d)  # [tokens, heads, query | gate]
        q, gate = query_gate[..., :d], query_gate[..., d:]
        inv_freq = self.rotary.inv_freq
        q = self.ops.norm_rope(q, self.q_norm.weight, self.q_norm.eps, batch.positions, inv_freq)
        k = self.ops.norm_rope(k.view(tokens, -1, d), self.k_norm.weight, self.k_norm.eps, batch.positions, inv_freq)
        out = self.ops.paged_attention(q, k, v.view(tokens, -1, d), kv_cache, batch, self.scale)
        out = out * torch.sigmoid(gate)
        return self.o_proj(out.reshape(tokens, -1))

"""Qwen3.5-MoE's sparse block: softmax top-k router, routed experts, and a sigmoid-gated shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hylo.distributed import TPGroup
from hylo.layers.linear import ReplicatedLinear
from hylo.layers.mlp import MLP
from hylo.layers.parts import Block, Part, check_parts


class Experts(nn.Module):
    """All routed experts as two stacked tensors, each expert's intermediate size split across ranks.

    Checkpoints store experts either one by one (`experts.N.gate_proj.weight` ...) or fused in 3D
    (`experts.gate_up_proj` [E, 2·I, H], `experts.down_proj` [E, H, I]); both are declared, and the
    loader requires that every expert be filled exactly once, whichever form the checkpoint has.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, tp: TPGroup, owner: str):
        super().__init__()
        self.num_experts = num_experts
        self.gate = Block("gate_proj", intermediate)
        self.up = Block("up_proj", intermediate)
        self.down = Block("down_proj", intermediate)
        self.local = self.gate.local_size(tp.size)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.local, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, self.local), requires_grad=False)
        check_parts(self.parts(), tp.size, owner)

    def parts(self) -> list[Part]:
        out = [
            Part("experts.gate_up_proj", self.w13, (self.gate, self.up), 1, module="experts.gate_up_proj"),
            Part("experts.down_proj", self.w2, (self.down,), 2, module="experts.down_proj"),
        ]
        for e in range(self.num_experts):
            w13, w2 = self.w13[e], self.w2[e]
            out += [
                Part(f"experts.{e}.gate_proj.weight", w13, (self.gate,), 0, 0, module=f"experts.{e}.gate_proj"),
                Part(f"experts.{e}.up_proj.weight", w13, (self.up,), 0, self.local, module=f"experts.{e}.up_proj"),
                Part(f"experts.{e}.down_proj.weight", w2, (self.down,), 1, module=f"experts.{e}.down_proj"),
            ]
        return out

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x: [tokens, hidden]; weights, experts: [tokens, top_k]. Returns this rank's partial sum."""
        out = torch.zeros_like(x)
        for e in experts.unique().tolist():
            token, slot = torch.where(experts == e)
            gate, up = F.linear(x[token], self.w13[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[e]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


class SparseMoE(nn.Module):
    def __init__(self, cfg, tp: TPGroup, owner: str):
        super().__init__()
        self.tp = tp
        self.top_k = cfg.num_experts_per_tok
        self.gate = ReplicatedLinear("gate", cfg.hidden_size, cfg.num_experts)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, tp, owner)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, tp, owner)
        self.shared_expert_gate = ReplicatedLinear("shared_expert_gate", cfg.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        probs = logits.softmax(dim=-1, dtype=torch.float)
        weights, experts = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(logits.dtype)
        routed = self.tp.all_reduce(self.experts(x, weights, experts))
        return routed + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

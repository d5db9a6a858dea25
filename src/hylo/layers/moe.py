"""Qwen3.5-MoE's sparse block: softmax top-k router, routed experts, and a sigmoid-gated shared expert."""

from __future__ import annotations

import torch
from torch import nn

from hylo.distributed import TPGroup
from hylo.kernels import Ops
from hylo.layers.linear import ColumnLinear, Proj, RowLinear
from hylo.layers.lora import LoRABatch
from hylo.layers.parts import Block, Part, check_parts, whole


class Experts(nn.Module):
    """All routed experts as two stacked tensors, each expert's intermediate size split across ranks.

    Checkpoints store experts either one by one (`experts.N.gate_proj.weight` ...) or fused in 3D
    (`experts.gate_up_proj` [E, 2·I, H], `experts.down_proj` [E, H, I]); both are declared, and the
    loader requires that every expert be filled exactly once, whichever form the checkpoint has.
    """

    def __init__(self, num_experts: int, top_k: int, hidden: int, intermediate: int, tp: TPGroup, ops: Ops, owner: str):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.ops = ops
        self.gate = Block("gate_proj", intermediate)
        self.up = Block("up_proj", intermediate)
        self.down = Block("down_proj", intermediate)
        self.local = self.gate.local_size(tp.size)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.local, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, self.local), requires_grad=False)
        check_parts(self.parts(), tp.size, owner)

    def parts(self) -> list[Part]:
        fused = "parameter"  # PEFT's target_parameters; its tensors are rewritten per expert when read
        out = [
            Part("experts.gate_up_proj", self.w13, (self.gate, self.up), 1, module="experts.gate_up_proj", lora=fused),
            Part("experts.down_proj", self.w2, (self.down,), 2, module="experts.down_proj", lora=fused),
        ]
        for e in range(self.num_experts):
            w13, w2 = self.w13[e], self.w2[e]
            out += [
                Part(f"experts.{e}.gate_proj.weight", w13, (self.gate,), 0, 0, module=f"experts.{e}.gate_proj", lora="expert"),
                Part(f"experts.{e}.up_proj.weight", w13, (self.up,), 0, self.local, module=f"experts.{e}.up_proj", lora="expert"),
                Part(f"experts.{e}.down_proj.weight", w2, (self.down,), 1, module=f"experts.{e}.down_proj", lora="expert"),
            ]
        return out

    def lora_parts(self) -> list[Part]:
        return [p for p in self.parts() if p.lora == "expert"]

    def enable_lora(self, max_loras: int, max_rank: int, batch: LoRABatch, tp_size: int) -> None:
        """Per slot and expert: A for gate and up [2, rank, hidden] and B over w13's rows; A and B of down_proj."""
        e, hidden, local = self.num_experts, self.w13.shape[2], self.local
        zeros = lambda *shape: torch.zeros(max_loras, e, *shape, dtype=self.w13.dtype, device=self.w13.device)  # noqa: E731
        self.lora_batch = batch
        batch.reserve_shrunk(self.top_k * 3 * max_rank)  # per token: its pairs' gate and up, then their down_proj
        self.lora_a13, self.lora_b13 = zeros(2, max_rank, hidden), zeros(2 * local, max_rank)
        self.lora_a2, self.lora_b2 = zeros(1, max_rank, local), zeros(hidden, max_rank)
        # The BGMV kernel's row → part maps: gate rows, then up rows; down_proj is one part.
        device = self.w13.device
        self.lora_row_part13 = torch.cat([torch.zeros(local, dtype=torch.int32, device=device), torch.ones(local, dtype=torch.int32, device=device)])
        self.lora_row_part2 = torch.zeros(hidden, dtype=torch.int32, device=device)

    def lora_slot(self, slot: int) -> list[torch.Tensor]:
        return [t[slot] for t in (self.lora_a13, self.lora_b13, self.lora_a2, self.lora_b2)]

    def lora_views(self, tensors: list[torch.Tensor], part: Part) -> tuple[torch.Tensor, torch.Tensor]:
        a13, b13, a2, b2 = tensors
        expert, name = part.module.split(".")[1:]
        e = int(expert)
        if name == "down_proj":
            return a2[e, 0], b2[e]
        return a13[e, 0 if name == "gate_proj" else 1], b13[e]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, shared_gate: torch.Tensor,
                shared: torch.Tensor) -> torch.Tensor:
        """x: [tokens, hidden]; weights, experts: [tokens, top_k]; the shared expert's gate logit [tokens, 1] and
        output [tokens, hidden], added as the routed sum is formed. Returns this rank's partial sum of the block."""
        return self.ops.routed_experts(self, x, weights, experts, shared_gate, shared)


class SparseMoE(nn.Module):
    def __init__(self, cfg, tp: TPGroup, ops: Ops, owner: str):
        super().__init__()
        self.ops = ops
        self.top_k = cfg.num_experts_per_tok
        shared = cfg.shared_expert_intermediate_size
        # Everything but the routed experts that reads the block's input, as one GEMM: the router and the shared
        # expert's gate (whole on every rank), the shared expert's gate and up projections (split). At batch 1 each
        # launch costs more than the bytes it reads. PEFT cannot wrap the router (not an nn.Linear in the reference),
        # so it takes no LoRA here either.
        self.in_proj = ColumnLinear(
            cfg.hidden_size,
            [
                Proj("gate", (whole("gate", cfg.num_experts),), lora=False),
                Proj("shared_expert_gate", (whole("shared_expert_gate", 1),)),
                Proj.plain("shared_expert.gate_proj", shared),
                Proj.plain("shared_expert.up_proj", shared),
            ],
            tp,
            owner,
        )
        self.experts = Experts(cfg.num_experts, self.top_k, cfg.hidden_size, cfg.moe_intermediate_size, tp, ops, owner)
        self.shared_expert_down = RowLinear(Proj.plain("shared_expert.down_proj", shared), cfg.hidden_size, tp, owner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_logits, shared_gate, shared_gate_proj, shared_up = self.in_proj(x)
        weights, experts = self.ops.route(router_logits, self.top_k)
        shared = self.shared_expert_down(self.ops.silu_mul(shared_gate_proj, shared_up))
        # Both terms are this rank's partial sums and the gate is the same on every rank, so the next norm's one
        # all-reduce sums the whole block.
        return self.experts(x, weights, experts, shared_gate, shared)

"""Routed experts on the GPU, with no host sync (so any step can be captured in a CUDA graph): a small batch as one
GEMV per (token, chosen expert) pair, the expert read from the router's output on the device; a larger one as
grouped matmuls over the pairs sorted by expert (`triton_grouped`).

Expert LoRA reuses the LoRA kernels: slot s of expert e is group s·E + e of the experts' flattened slot tensors.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hylo.kernels.triton_grouped import SortedRows, grouped_matmul, lora_sgmv, sort_rows
from hylo.kernels.triton_lora import lora_bgmv

GEMV_PAIRS = 256  # up to this many (token, expert) pairs, per-pair GEMVs beat sorting (scripts/compare_moe_paths.py)


# At batch 1 a layer's GEMVs read ~50 MB in a few hundred programs; the best tile depends on the expert's shape.
# (Triton's interpreter cannot time configs: it gets the first.)
GEMV_TILES = [(32, 256, 4), (16, 256, 4), (16, 512, 4), (8, 512, 4), (64, 128, 4), (32, 512, 8)]


@triton.autotune(
    configs=[triton.Config({"BN": bn, "BK": bk}, num_warps=w) for bn, bk, w in GEMV_TILES[: 1 if os.environ.get("TRITON_INTERPRET") == "1" else None]],
    key=["n_out", "IN"],
)
@triton.jit
def _expert_gemv_kernel(x_ptr, x_row, w_ptr, experts_ptr, out_ptr, n_out, x_div,
                        IN: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pair = tl.program_id(0)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    rm = rows < n_out
    expert = tl.load(experts_ptr + pair).to(tl.int64)
    x_base = x_ptr + (pair // x_div) * x_row
    acc = tl.zeros([BN], tl.float32)
    for start in range(0, IN, BK):
        cols = start + tl.arange(0, BK)
        cm = cols < IN
        x = tl.load(x_base + cols, mask=cm, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + (expert * n_out + rows[:, None]) * IN + cols[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    tl.store(out_ptr + pair * n_out + rows, acc.to(out_ptr.dtype.element_ty), mask=rm)


def _expert_matmul(x: torch.Tensor, weight: torch.Tensor, experts: torch.Tensor, x_div: int, by_expert: SortedRows | None) -> torch.Tensor:
    """out[p] = weight[experts[p]] · x[p // x_div]; weight [E, out, in]. Per pair unless the pairs come sorted."""
    pairs = experts.numel()
    _, n_out, n_in = weight.shape
    out = torch.empty(pairs, n_out, dtype=x.dtype, device=x.device)
    if by_expert is not None:
        grouped_matmul(x, weight, out, by_expert, x_div)
        return out
    grid = lambda meta: (pairs, triton.cdiv(n_out, meta["BN"]))  # noqa: E731
    _expert_gemv_kernel[grid](x, x.stride(0), weight, experts, out, n_out, x_div, IN=n_in)
    return out


def routed_experts(layer, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gemv_pairs: int | None = None) -> torch.Tensor:
    """Same contract as `reference.routed_experts`: x [tokens, hidden]; weights, experts [tokens, top_k]."""
    top_k = experts.shape[1]
    flat = experts.reshape(-1)
    per_pair = flat.numel() <= (GEMV_PAIRS if gemv_pairs is None else gemv_pairs)
    by_expert = None if per_pair else sort_rows(flat, layer.num_experts)
    batch = getattr(layer, "lora_batch", None)
    lora = _ExpertLoRA(layer, flat, top_k) if batch is not None and batch.active else None
    gate_up = _expert_matmul(x, layer.w13, flat, top_k, by_expert)  # [pairs, 2·local]
    if lora:
        lora.add(x, gate_up, layer.lora_a13, layer.lora_b13, layer.lora_row_part13, top_k)
    gate, up = gate_up.chunk(2, dim=-1)
    hidden = F.silu(gate) * up
    y = _expert_matmul(hidden, layer.w2, flat, 1, by_expert)  # [pairs, hidden]
    if lora:
        lora.add(hidden, y, layer.lora_a2, layer.lora_b2, layer.lora_row_part2, 1)
    return (y.view(-1, top_k, y.shape[1]).float() * weights[..., None].float()).sum(dim=1).to(x.dtype)


class _ExpertLoRA:
    """Each pair's adapter on each pair's expert: a decode step reads the groups per pair (BGMV); a larger step sorts
    the pairs by group once for the layer (SGMV)."""

    def __init__(self, layer, experts: torch.Tensor, top_k: int):
        lora = layer.lora_batch
        slots = lora.token_slots.repeat_interleave(top_k)
        self.groups = torch.where(slots >= 0, slots * layer.num_experts + experts, -1)
        self.sorted = None if lora.per_token else sort_rows(self.groups, layer.lora_a13.shape[0] * layer.num_experts)

    def add(self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, row_part: torch.Tensor, x_div: int) -> None:
        a, b = a.flatten(0, 1), b.flatten(0, 1)
        if self.sorted is not None:
            lora_sgmv(x, y, a, b, row_part, self.sorted, x_div)
        else:
            lora_bgmv(x.repeat_interleave(x_div, dim=0), y, a, b, row_part, self.groups)

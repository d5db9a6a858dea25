"""Routed experts for small batches (decode): one GEMV per (token, chosen expert) pair, the expert read from the
router's output on the device, so the step holds no host loop and can be captured in a CUDA graph.

Expert LoRA reuses the BGMV kernel: slot s of expert e is entry s·E + e of the experts' slot tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hylo.kernels.triton_lora import lora_bgmv


@triton.jit
def _expert_gemv_kernel(x_ptr, x_row, w_ptr, experts_ptr, out_ptr, n_out, top_k,
                        IN: tl.constexpr, X_PER_PAIR: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pair = tl.program_id(0)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    rm = rows < n_out
    expert = tl.load(experts_ptr + pair).to(tl.int64)
    x_base = x_ptr + (pair if X_PER_PAIR else pair // top_k) * x_row
    acc = tl.zeros([BN], tl.float32)
    for start in range(0, IN, BK):
        cols = start + tl.arange(0, BK)
        cm = cols < IN
        x = tl.load(x_base + cols, mask=cm, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + (expert * n_out + rows[:, None]) * IN + cols[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    tl.store(out_ptr + pair * n_out + rows, acc.to(out_ptr.dtype.element_ty), mask=rm)


def _expert_gemv(x: torch.Tensor, weight: torch.Tensor, experts: torch.Tensor, top_k: int, x_per_pair: bool) -> torch.Tensor:
    """out[p] = weight[experts[p]] · x[p if x_per_pair else p // top_k]; weight [E, out, in]."""
    pairs = experts.numel()
    _, n_out, n_in = weight.shape
    out = torch.empty(pairs, n_out, dtype=x.dtype, device=x.device)
    block = 32
    _expert_gemv_kernel[(pairs, triton.cdiv(n_out, block))](
        x, x.stride(0), weight, experts, out, n_out, top_k, IN=n_in, X_PER_PAIR=x_per_pair, BN=block, BK=256
    )
    return out


def routed_experts(layer, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Same contract as `reference.routed_experts`: x [tokens, hidden]; weights, experts [tokens, top_k]."""
    tokens, top_k = experts.shape
    flat = experts.reshape(-1)
    gate_up = _expert_gemv(x, layer.w13, flat, top_k, x_per_pair=False)  # [pairs, 2·local]
    lora = getattr(layer, "lora_batch", None)
    if lora is not None:
        num_experts = layer.num_experts
        slots = lora.token_slots.repeat_interleave(top_k)
        pair_slots = torch.where(slots >= 0, slots * num_experts + flat, -1)
        a13, b13, a2, b2 = (t.flatten(0, 1) for t in (layer.lora_a13, layer.lora_b13, layer.lora_a2, layer.lora_b2))
        lora_bgmv(x.repeat_interleave(top_k, dim=0), gate_up, a13, b13, layer.lora_row_part13, pair_slots)
    gate, up = gate_up.chunk(2, dim=-1)
    hidden = F.silu(gate) * up
    y = _expert_gemv(hidden, layer.w2, flat, top_k, x_per_pair=True)  # [pairs, hidden]
    if lora is not None:
        lora_bgmv(hidden, y, a2, b2, layer.lora_row_part2, pair_slots)
    return (y.view(tokens, top_k, -1).float() * weights[..., None].float()).sum(dim=1).to(x.dtype)

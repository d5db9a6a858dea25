"""Multi-adapter LoRA for decode steps (BGMV-style, as in Punica and S-LoRA): each token reads its own slot's A and B.

Two launches per layer whatever the number of adapters in the batch: the shrink computes x·Aᵀ for
every part of a fused layer at once, the expand adds each part's rank slice times B into that
part's output rows. Tokens with slot -1 (the base model) do no work. Slots are read from a device
tensor, so the step can be captured in a CUDA graph; writing adapters into slots changes the data
the graph reads, never its shape. The shrink sums into a scratch that the step zeroed once for every
layer (`LoRABatch.take_shrunk`). A MoE's (token, expert) pairs find their group (slot and expert) in the
kernels too, so expert LoRA launches nothing more.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SHRINK_COLUMNS = 256  # input columns per shrink program


@triton.jit
def _group(slots_ptr, slot_div, experts_ptr, n_experts, t, EXPERTS: tl.constexpr):
    """Row t's slot, or its slot's group for its expert (MoE: group s·E + e); -1: no adapter."""
    slot = tl.load(slots_ptr + t // slot_div).to(tl.int64)
    if EXPERTS:
        slot = tl.where(slot >= 0, slot * n_experts + tl.load(experts_ptr + t).to(tl.int64), -1)
    return slot


@triton.jit
def _shrink_kernel(x_ptr, x_row, x_div, a_ptr, slots_ptr, slot_div, experts_ptr, n_experts, s_ptr, in_features, parts,
                   RANK: tl.constexpr, RP: tl.constexpr, BK: tl.constexpr, EXPERTS: tl.constexpr):
    t = tl.program_id(0)
    p = tl.program_id(1)
    slot = _group(slots_ptr, slot_div, experts_ptr, n_experts, t, EXPERTS)
    if slot >= 0:
        r = tl.arange(0, RP)
        cols = tl.program_id(2) * BK + tl.arange(0, BK)
        cm = cols < in_features
        x = tl.load(x_ptr + (t // x_div) * x_row + cols, mask=cm, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + ((slot * parts + p) * RANK + r[:, None]) * in_features + cols[None, :],
                    mask=(r[:, None] < RANK) & cm[None, :], other=0.0).to(tl.float32)
        tl.atomic_add(s_ptr + (t * parts + p) * RANK + r, tl.sum(a * x[None, :], axis=1), mask=r < RANK, sem="relaxed")


@triton.jit
def _expand_kernel(s_ptr, b_ptr, slots_ptr, slot_div, experts_ptr, n_experts, row_part_ptr, y_ptr, y_row, out_features, parts,
                   RANK: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr, EXPERTS: tl.constexpr):
    t = tl.program_id(0)
    slot = _group(slots_ptr, slot_div, experts_ptr, n_experts, t, EXPERTS)
    if slot >= 0:
        rows = tl.program_id(1) * BN + tl.arange(0, BN)
        part = tl.load(row_part_ptr + rows, mask=rows < out_features, other=-1)
        valid = part >= 0
        r = tl.arange(0, RP)
        m = valid[:, None] & (r[None, :] < RANK)
        s = tl.load(s_ptr + (t * parts + part[:, None]) * RANK + r[None, :], mask=m, other=0.0)
        b = tl.load(b_ptr + (slot * out_features + rows[:, None]) * RANK + r[None, :], mask=m, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + t * y_row + rows, mask=valid, other=0.0)
        tl.store(y_ptr + t * y_row + rows, (y.to(tl.float32) + tl.sum(s * b, axis=1)).to(y.dtype), mask=valid)


def lora_bgmv(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, row_part: torch.Tensor, token_slots: torch.Tensor,
              shrunk: torch.Tensor, experts: torch.Tensor | None = None, n_experts: int = 0) -> None:
    """y[t] += B[g]·(A[g]·x[t]) per part, in place, g = row t's slot. x [tokens, in]; y [tokens, out]; a [groups, parts,
    rank, in]; b [groups, out, rank] (scaling folded in); row_part [out]: the part each output row belongs to (-1:
    none); shrunk: zeros, float32, [rows of y, parts·rank] (left holding x·Aᵀ). MoE: y's rows are (token, expert) pairs,
    `experts` [pairs] their experts, g = slot·n_experts + expert with the pair's token's slot; x has a row per pair or
    per token."""
    lora_shrink(x, a, token_slots, shrunk, experts, n_experts)
    lora_expand(shrunk, y, b, row_part, token_slots, experts, n_experts)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, token_slots: torch.Tensor, shrunk: torch.Tensor, experts: torch.Tensor | None = None,
                n_experts: int = 0) -> None:
    """shrunk[t] += A[g]·x[t] per part (`lora_bgmv`'s first half): it reads x and A only, so it may run beside the
    base GEMM."""
    rows, in_features = shrunk.shape[0], x.shape[1]
    _, parts, rank, _ = a.shape
    # Many small programs per token and part, each a slice of the input, summed atomically: at batch 1 a
    # single program per part would read its whole A alone, far below the memory bandwidth.
    _shrink_kernel[(rows, parts, triton.cdiv(in_features, SHRINK_COLUMNS))](
        x, x.stride(0), rows // x.shape[0], a, *_group_args(rows, token_slots, experts, n_experts), shrunk, in_features, parts,
        RANK=rank, RP=triton.next_power_of_2(rank), BK=SHRINK_COLUMNS, EXPERTS=experts is not None
    )


def lora_expand(shrunk: torch.Tensor, y: torch.Tensor, b: torch.Tensor, row_part: torch.Tensor, token_slots: torch.Tensor,
                experts: torch.Tensor | None = None, n_experts: int = 0) -> None:
    """y[t] += B[g]·shrunk[t] per part (`lora_bgmv`'s second half)."""
    rows, out_features = y.shape
    rank = b.shape[2]
    parts = shrunk.shape[1] // rank
    block = 64
    _expand_kernel[(rows, triton.cdiv(out_features, block))](
        shrunk, b, *_group_args(rows, token_slots, experts, n_experts), row_part, y, y.stride(0), out_features, parts, RANK=rank,
        RP=triton.next_power_of_2(rank), BN=block, EXPERTS=experts is not None
    )


def _group_args(rows: int, token_slots: torch.Tensor, experts: torch.Tensor | None, n_experts: int) -> tuple:
    """The kernels' (slots, rows per slot, experts, number of experts) for `_group`."""
    return token_slots, rows // token_slots.numel(), token_slots if experts is None else experts, n_experts

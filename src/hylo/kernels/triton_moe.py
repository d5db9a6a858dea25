"""Routed experts on the GPU, with no host sync (so any step can be captured in a CUDA graph): a small batch as one
GEMV per (token, chosen expert) pair, the expert read from the router's output on the device; a larger one as
grouped matmuls over the pairs sorted by expert (`triton_grouped`). The router's softmax and top-k, the SiLU and
the weighted sum of each token's pairs are one launch each: at batch 1 the step is bound by its number of kernels.

Expert LoRA reuses the LoRA kernels: slot s of expert e is group s·E + e of the experts' flattened slot tensors.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hylo.kernels.triton_activations import silu_mul
from hylo.kernels.triton_grouped import SortedRows, grouped_matmul, lora_sgmv, sort_rows
from hylo.kernels.triton_lora import lora_bgmv, lora_expand, lora_shrink

GEMV_PAIRS = 256  # up to this many (token, expert) pairs, per-pair GEMVs beat sorting (scripts/compare_moe_paths.py)


# At batch 1 a layer's GEMVs read ~50 MB in a few hundred programs; the best tile depends on the expert's shape. The
# one-warp and one-row tiles were the fastest on the 35B-A3B experts at 128 pairs (a scan on an H200, in
# docs/benchmarks.md): 4.45 TB/s against 4.07 for the best of the others.
# (Triton's interpreter cannot time configs: it gets the first.)
GEMV_TILES = [(32, 256, 4), (16, 256, 4), (16, 512, 4), (8, 512, 4), (64, 128, 4), (32, 512, 8), (4, 512, 1), (1, 2048, 2)]


@triton.autotune(
    configs=[triton.Config({"BN": bn, "BK": bk}, num_warps=w) for bn, bk, w in GEMV_TILES[: 1 if os.environ.get("TRITON_INTERPRET") == "1" else None]],
    key=["n_out", "IN", "GATED"],
)
@triton.jit
def _expert_gemv_kernel(x_ptr, x_row, w_ptr, experts_ptr, out_ptr, h_ptr, n_out, x_div,
                        IN: tl.constexpr, GATED: tl.constexpr, WRITE_H: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pair = tl.program_id(0)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    rm = rows < n_out
    expert = tl.load(experts_ptr + pair).to(tl.int64)
    x_base = x_ptr + (pair // x_div) * x_row
    acc = tl.zeros([BN], tl.float32)
    for start in range(0, IN, BK):
        cols = start + tl.arange(0, BK)
        cm = cols < IN
        if GATED:  # x holds [gate | up]: SiLU(gate)·up as it is read, rounded as `silu_mul` rounds it
            g = tl.load(x_base + cols, mask=cm, other=0.0).to(tl.float32)
            u = tl.load(x_base + IN + cols, mask=cm, other=0.0).to(tl.float32)
            h = (g / (1.0 + tl.exp(-g)) * u).to(x_ptr.dtype.element_ty)
            if WRITE_H and tl.program_id(1) == 0:  # the activation itself, for the LoRA that reads it
                tl.store(h_ptr + pair * IN + cols, h, mask=cm)
            x = h.to(tl.float32)
        else:
            x = tl.load(x_base + cols, mask=cm, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + (expert * n_out + rows[:, None]) * IN + cols[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    tl.store(out_ptr + pair * n_out + rows, acc.to(out_ptr.dtype.element_ty), mask=rm)


def _expert_matmul(x: torch.Tensor, weight: torch.Tensor, experts: torch.Tensor, x_div: int, by_expert: SortedRows | None) -> torch.Tensor:
    """out[p] = weight[experts[p]] · x[p // x_div]; weight [E, out, in]. Per pair unless the pairs come sorted."""
    if by_expert is None:
        return _expert_gemv(x, weight, experts, x_div)
    out = torch.empty(experts.numel(), weight.shape[1], dtype=x.dtype, device=x.device)
    grouped_matmul(x, weight, out, by_expert, x_div)
    return out


def _expert_gemv(x: torch.Tensor, weight: torch.Tensor, experts: torch.Tensor, x_div: int, gated: bool = False,
                 hidden: torch.Tensor | None = None) -> torch.Tensor:
    """One program per pair and tile of output rows. `gated`: x is [pairs, 2·in] ([gate | up]), activated as it is
    read, and the activation [pairs, in] is written to `hidden` if given."""
    pairs, n_out = experts.numel(), weight.shape[1]
    out = torch.empty(pairs, n_out, dtype=x.dtype, device=x.device)
    grid = lambda meta: (pairs, triton.cdiv(n_out, meta["BN"]))  # noqa: E731
    _expert_gemv_kernel[grid](x, x.stride(0), weight, experts, out, out if hidden is None else hidden, n_out, x_div,
                              IN=weight.shape[2], GATED=gated, WRITE_H=hidden is not None)
    return out


def routed_experts(layer, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, shared_gate: torch.Tensor,
                   shared: torch.Tensor, gemv_pairs: int | None = None) -> torch.Tensor:
    """Same contract as `reference.routed_experts`: x [tokens, hidden]; weights, experts [tokens, top_k]; the shared
    expert's gate logit [tokens, 1] and output [tokens, hidden] join in the last launch."""
    top_k = experts.shape[1]
    flat = experts.reshape(-1)
    per_pair = flat.numel() <= (GEMV_PAIRS if gemv_pairs is None else gemv_pairs)
    by_expert = None if per_pair else sort_rows(flat, layer.num_experts)
    batch = getattr(layer, "lora_batch", None)
    lora = _ExpertLoRA(layer, flat, top_k) if batch is not None and batch.active else None
    shrunk13 = lora.shrink_beside(x, layer.lora_a13) if lora else None
    gate_up = _expert_matmul(x, layer.w13, flat, top_k, by_expert)  # [pairs, 2·local]
    if lora:
        lora.add(x, gate_up, layer.lora_a13, layer.lora_b13, layer.lora_row_part13, top_k, shrunk13)
    if by_expert is None:
        # The activation is applied as the down GEMV reads its input (one launch fewer per layer at decode); the same
        # launch writes it out for the adapters' down_proj, which reads it.
        hidden = torch.empty(flat.numel(), layer.local, dtype=x.dtype, device=x.device) if lora else None
        y = _expert_gemv(gate_up, layer.w2, flat, 1, gated=True, hidden=hidden)
    else:
        hidden = silu_mul(*gate_up.chunk(2, dim=-1))
        y = _expert_matmul(hidden, layer.w2, flat, 1, by_expert)  # [pairs, hidden]
    if lora:
        lora.add(hidden, y, layer.lora_a2, layer.lora_b2, layer.lora_row_part2, 1)
    return combine_pairs(y, weights, shared_gate, shared)


class _ExpertLoRA:
    """Each pair's adapter on each pair's expert: a decode step finds each pair's group in the kernels (BGMV); a larger
    step sorts the pairs by group once for the layer (SGMV)."""

    def __init__(self, layer, experts: torch.Tensor, top_k: int):
        self.batch, self.experts, self.n_experts = layer.lora_batch, experts, layer.num_experts
        self.sorted = None
        if not self.batch.per_token:
            slots = self.batch.token_slots.repeat_interleave(top_k)
            groups = torch.where(slots >= 0, slots * layer.num_experts + experts, -1)
            self.sorted = sort_rows(groups, layer.lora_a13.shape[0] * layer.num_experts)

    def shrink_beside(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
        """A decode step's gate and up shrink, launched beside the experts' GEMV (it reads only the block's input);
        `add` joins it. None in a step that sorts the pairs."""
        if self.sorted is not None:
            return None
        a = a.flatten(0, 1)
        shrunk = self.batch.take_shrunk(self.experts.numel(), a.shape[1] * a.shape[2])
        with self.batch.beside(x.device):
            lora_shrink(x, a, self.batch.token_slots, shrunk, self.experts, self.n_experts)
        return shrunk

    def add(self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, row_part: torch.Tensor, x_div: int,
            shrunk: torch.Tensor | None = None) -> None:
        """y += each pair's delta; `shrunk`: from `shrink_beside`, whose expand is all that is left."""
        a, b = a.flatten(0, 1), b.flatten(0, 1)
        if self.sorted is not None:
            lora_sgmv(x, y, a, b, row_part, self.sorted, x_div)
        elif shrunk is not None:
            self.batch.join(y.device)
            lora_expand(shrunk, y, b, row_part, self.batch.token_slots, self.experts, self.n_experts)
        else:
            shrunk = self.batch.take_shrunk(y.shape[0], a.shape[1] * a.shape[2])
            lora_bgmv(x, y, a, b, row_part, self.batch.token_slots, shrunk, self.experts, self.n_experts)


@triton.jit
def _combine_kernel(y_ptr, w_ptr, gate_ptr, gate_row, shared_ptr, out_ptr, n, K: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(K):
        pair = token * K + j
        y = tl.load(y_ptr + pair.to(tl.int64) * n + cols, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(w_ptr + pair).to(tl.float32) * y
    routed = acc.to(out_ptr.dtype.element_ty).to(tl.float32)  # rounded, as the reference's routed sum is
    row = token.to(tl.int64) * n
    g = tl.load(gate_ptr + token.to(tl.int64) * gate_row).to(tl.float32)
    shared = tl.load(shared_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row + cols, (routed + shared / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty), mask=mask)


def combine_pairs(y: torch.Tensor, weights: torch.Tensor, shared_gate: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """out[t] = Σ_j weights[t, j] · y[t·k + j] + σ(shared_gate[t]) · shared[t], the MoE block's output in one launch:
    y [tokens·k, hidden] (pairs in token order), weights [tokens, k], shared_gate [tokens, 1] (a row view will do),
    shared [tokens, hidden]. Float32 inside; the routed sum is rounded to y's dtype before the shared expert joins,
    as `reference.routed_experts` rounds it."""
    tokens, top_k = weights.shape
    n = y.shape[1]
    shared = shared.contiguous()  # a no-op for the shared expert's output
    out = torch.empty(tokens, n, dtype=y.dtype, device=y.device)
    block = min(1024, triton.next_power_of_2(n))
    _combine_kernel[(tokens, triton.cdiv(n, block))](y, weights.contiguous(), shared_gate, shared_gate.stride(0), shared, out, n,
                                                     K=top_k, BLOCK=block)
    return out


@triton.jit
def _route_kernel(logits_ptr, logits_row, weights_ptr, ids_ptr, n_experts,
                  K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    live = cols < n_experts
    x = tl.load(logits_ptr + row * logits_row + cols, mask=live, other=float("-inf")).to(tl.float32)
    e = tl.exp(x - tl.max(x, axis=0))
    probs = e / tl.sum(e, axis=0)
    # Probabilities are >= 0: -1 is "taken, or no expert". A NaN (non-finite hidden states, e.g. a broken adapter) is
    # -1 too, so every pick stays a real lane: an id past the experts would make the GEMVs read out of bounds.
    probs = tl.where(live & (probs == probs), probs, -1.0)
    slots = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_K], tl.float32)
    top_id = tl.zeros([BLOCK_K], tl.int64)
    # k rounds of argmax over the row in registers. Among equal probabilities the lowest id goes first, as
    # torch.topk does on CUDA in practice; ties need equal logits (possible in bf16, measure-zero in float), and
    # only change which experts run when they straddle the k-th place.
    for j in tl.static_range(K):
        best = tl.max(probs, axis=0)
        pick = tl.min(tl.where(probs == best, cols, BLOCK_E), axis=0)
        top_w = tl.where(slots == j, best, top_w)
        top_id = tl.where(slots == j, pick, top_id)
        probs = tl.where(cols == pick, -1.0, probs)
    out = row * K + slots
    tl.store(weights_ptr + out, (top_w / tl.sum(top_w, axis=0)).to(weights_ptr.dtype.element_ty), mask=slots < K)
    tl.store(ids_ptr + out, top_id, mask=slots < K)


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.route` in one launch (no host sync): logits [tokens, experts], last dim contiguous. Returns the
    normalised top-k weights [tokens, top_k] in the logits' dtype and the expert ids [tokens, top_k] (int64)."""
    tokens, n_experts = logits.shape
    weights = torch.empty(tokens, top_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device)
    block = triton.next_power_of_2(n_experts)
    # One warp per row: the 2·k reductions run in sequence, and within a warp none of them waits on a barrier.
    _route_kernel[(tokens,)](logits, logits.stride(0), weights, ids, n_experts, K=top_k, BLOCK_E=block,
                             BLOCK_K=triton.next_power_of_2(top_k), num_warps=1 if block <= 512 else 4)
    return weights, ids

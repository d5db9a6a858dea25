"""Greedy sampling in one launch: each row's argmax and whether the row is finite. With torch's ops, sampling a
decode step took about fifteen launches between two graph replays (five for `isfinite().all()`, a `where`, a clone,
the argmax, a stack, ...): ~58 µs at batch 1 and ~107 µs at batch 16 on an H100 (9B shape), the GPU doing nothing else."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _greedy_kernel(logits_ptr, row_stride, vocab, out_ptr, rows, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * row_stride
    best = float("-inf")
    best_col = 0
    bad = 0
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        x = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32)
        bad += tl.sum((inside & ((x != x) | (tl.abs(x) == float("inf")))).to(tl.int32), axis=0)
        top = tl.max(x, axis=0)
        # Ties go to the lowest column, as torch's argmax: the first within a block, the earlier block across them.
        better = top > best
        best_col = tl.where(better, start + tl.argmax(x, axis=0, tie_break_left=True), best_col)
        best = tl.where(better, top, best)
    tl.store(out_ptr + row, best_col.to(tl.int64))
    tl.store(out_ptr + rows + row, (bad == 0).to(tl.int64))


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """`reference.greedy_tokens`: [2, rows] int64, each row's argmax (the lowest column among equal maxima) and 1 where
    every logit of the row is finite, else 0 (that row's token is then meaningless). logits [rows, vocab], last dim
    contiguous."""
    rows, vocab = logits.shape
    out = torch.empty(2, rows, dtype=torch.long, device=logits.device)
    _greedy_kernel[(rows,)](logits, logits.stride(0), vocab, out, rows, BLOCK=BLOCK, num_warps=8)
    return out

"""Grouped matmuls over rows sorted by group: the MoE layer's experts and the prefill LoRA (SGMV-style, as in
Punica and S-LoRA) on one kernel.

Rows (tokens, or (token, expert) pairs) are sorted by their group (an expert, an adapter slot, or both)
and each group's run is padded to a multiple of the row block, so every block of rows multiplies by one
group's weight: the weight is read once per block, and the block is one `tl.dot` tile. Sorting runs on the
device with shapes known on the host, so the MoE layer stays graph-safe at any batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass
class SortedRows:
    """Rows sorted by group. `rows` [blocks·block]: a row index, or -1 (padding); `block_groups` [blocks]: the
    group of each block of rows, or -1 (an empty block past the last group)."""

    rows: torch.Tensor
    block_groups: torch.Tensor
    block: int


def sort_rows(groups: torch.Tensor, num_groups: int, block: int | None = None) -> SortedRows:
    """Sort row indices 0..n-1 by `groups` [n] (values in [0, num_groups), or -1: the row takes part in nothing),
    each group's run padded to the row block (by default about one block per group, 16 to 64 rows). No host sync."""
    n = groups.numel()
    block = block or min(64, max(16, triton.next_power_of_2(max(1, n // num_groups))))
    key = torch.where(groups >= 0, groups, num_groups)
    order = key.argsort(stable=True)
    ids = torch.arange(num_groups, device=groups.device)
    start = torch.searchsorted(key[order], ids)  # each group's first position in `order`
    count = torch.searchsorted(key[order], ids, right=True) - start
    padded = (count + block - 1) // block * block
    padded_end = padded.cumsum(0)
    # Every non-empty block holds at least one row, and groups add at most one partial block each.
    blocks = min(n, triton.cdiv(n, block) + num_groups)
    position = torch.arange(blocks * block, device=groups.device)
    group = torch.searchsorted(padded_end, position, right=True)  # num_groups past the last group's padding
    g = group.clamp(max=num_groups - 1)
    within = position - (padded_end[g] - padded[g])
    valid = (group < num_groups) & (within < count[g])
    rows = torch.where(valid, order[(start[g] + within).clamp(max=n - 1)], -1)
    first = group[::block]
    return SortedRows(rows, torch.where(first < num_groups, first, -1), block)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _grouped_kernel(x_ptr, x_row, w_ptr, out_ptr, out_row, rows_ptr, block_groups_ptr, row_part_ptr, n_out, x_div,
                    K: tl.constexpr, EXPAND: tl.constexpr, RANK: tl.constexpr, ACCUMULATE: tl.constexpr, IEEE: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    group = tl.load(block_groups_ptr + tl.program_id(0)).to(tl.int64)
    if group < 0:
        return
    rows = tl.load(rows_ptr + tl.program_id(0) * BM + tl.arange(0, BM))
    row_ok = rows >= 0
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_ok = cols < n_out
    if EXPAND:
        part = tl.load(row_part_ptr + cols, mask=col_ok, other=-1)
    acc = tl.zeros([BM, BN], tl.float32)
    for start in range(0, K, BK):
        ks = start + tl.arange(0, BK)
        k_ok = ks < K
        x = tl.load(x_ptr + (rows // x_div)[:, None].to(tl.int64) * x_row + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if EXPAND:
            # LoRA's B [groups, out, rank] as a block-diagonal [out, parts·rank]: column c reads its own part's rank slice.
            r = ks[:, None] - part[None, :] * RANK
            w = tl.load(w_ptr + (group * n_out + cols[None, :]) * RANK + r, mask=(r >= 0) & (r < RANK) & col_ok[None, :], other=0.0)
        else:
            w = tl.load(w_ptr + (group * n_out + cols[None, :]) * K + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += _dot(x.to(w.dtype), w, IEEE)
    out = out_ptr + rows[:, None].to(tl.int64) * out_row + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, sorted_rows: SortedRows, x_div: int = 1,
                   row_part: torch.Tensor | None = None, accumulate: bool = False) -> None:
    """out[r] (+)= weight[g]·x[r // x_div] for each row r of group g. weight [groups, out, in]; or, with `row_part`
    (the LoRA expand), B [groups, out, rank] applied to x [rows, parts·rank], each output row to its own part's slice."""
    n_out = weight.shape[1]
    rank = weight.shape[2] if row_part is not None else 1
    k_in = x.shape[1]
    bm = sorted_rows.block
    bn = 128 if bm >= 64 else 64
    # float32's IEEE dot runs on FMAs and needs more registers: its 64×128 tile over 4 warps spilled 6 KiB per thread
    # (Triton 3.6, sm_90), and the CUDA context keeps the local memory spills grow (per-thread stack × every resident
    # thread: 1.6 GiB of an H200) until the process exits. Half the K step over 8 warps fits. bf16's tile does not spill.
    fp32_wide = x.dtype == torch.float32 and bm >= 64
    bk = min(32 if fp32_wide else 64, max(16, triton.next_power_of_2(k_in)))
    warps = 8 if fp32_wide else 4
    grid = (sorted_rows.block_groups.numel(), triton.cdiv(n_out, bn))
    if grid[0] == 0:
        return
    _grouped_kernel[grid](
        x, x.stride(0), weight, out, out.stride(0), sorted_rows.rows, sorted_rows.block_groups,
        row_part if row_part is not None else sorted_rows.rows, n_out, x_div,
        K=k_in, EXPAND=row_part is not None, RANK=rank, ACCUMULATE=accumulate, IEEE=x.dtype == torch.float32, BM=bm, BN=bn, BK=bk,
        num_warps=warps, num_stages=3,
    )


def lora_sgmv(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, row_part: torch.Tensor,
              sorted_rows: SortedRows, x_div: int = 1) -> None:
    """y[r] += B[g]·(A[g]·x[r // x_div]) per part, in place, for each row r of adapter group g (prefill LoRA).
    a [groups, parts, rank, in]; b [groups, out, rank] (scaling folded in); row_part [out] as in `lora_bgmv`."""
    groups, parts, rank, in_features = a.shape
    # The shrink rounds to the model dtype between the two products, as the grouped-matmul reference does.
    shrunk = torch.empty(y.shape[0], parts * rank, dtype=y.dtype, device=y.device)
    grouped_matmul(x, a.view(groups, parts * rank, in_features), shrunk, sorted_rows, x_div)
    grouped_matmul(shrunk, b, y, sorted_rows, row_part=row_part, accumulate=True)

"""Prefill kernels in Triton: many tokens per sequence, read from the flat batch without host syncs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hylo.batch import Batch


@triton.jit
def _conv_prefill_kernel(x_ptr, x_row, w_ptr, state_ptr, out_ptr, token_seq_ptr, starts_ptr, slots_ptr, has_past_ptr, tokens, channels,
                         WIDTH: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    tm, cm = t < tokens, c < channels
    seq = tl.load(token_seq_ptr + t, mask=tm, other=0)
    start = tl.load(starts_ptr + seq, mask=tm, other=0)
    slot = tl.load(slots_ptr + seq, mask=tm, other=0).to(tl.int64)
    has_past = tl.load(has_past_ptr + seq, mask=tm, other=0) != 0
    acc = tl.zeros([BT, BC], tl.float32)
    for j in tl.static_range(WIDTH):
        src = t - (WIDTH - 1) + j  # the input this tap reads: a token of this step, or one kept in the slot's window
        inside = src >= start
        m = tm[:, None] & cm[None, :]
        x = tl.load(x_ptr + src[:, None].to(tl.int64) * x_row + c[None, :], mask=m & inside[:, None], other=0.0)
        window = (WIDTH - 1) + src - start  # position in the slot's window of the last WIDTH - 1 inputs
        past = tl.load(state_ptr + (slot[:, None] * channels + c[None, :]) * (WIDTH - 1) + window[:, None],
                       mask=m & (~inside & has_past)[:, None], other=0.0)
        w = tl.load(w_ptr + c * WIDTH + j, mask=cm, other=0.0).to(tl.float32)
        acc += (x.to(tl.float32) + past.to(tl.float32)) * w[None, :]
    tl.store(out_ptr + t[:, None].to(tl.int64) * channels + c[None, :], (acc * tl.sigmoid(acc)).to(out_ptr.dtype.element_ty),
             mask=tm[:, None] & cm[None, :])


@triton.jit
def _conv_state_kernel(x_ptr, x_row, state_ptr, starts_ptr, slots_ptr, has_past_ptr, channels, WIDTH: tl.constexpr, BC: tl.constexpr):
    n = tl.program_id(0)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = c < channels
    start = tl.load(starts_ptr + n)
    length = tl.load(starts_ptr + n + 1) - start
    has_past = tl.load(has_past_ptr + n) != 0
    base = state_ptr + (tl.load(slots_ptr + n).to(tl.int64) * channels + c) * (WIDTH - 1)
    # The new window is the old one followed by this step's inputs, cut to its last WIDTH - 1. Entry i reads entry
    # length + i > i of the old window, which a later iteration overwrites, so updating in place is safe.
    for i in tl.static_range(WIDTH - 1):
        w = length + i
        new = tl.load(x_ptr + (start + w - (WIDTH - 1)).to(tl.int64) * x_row + c, mask=cm & (w >= WIDTH - 1), other=0.0)
        old = tl.load(base + w, mask=cm & (w < WIDTH - 1) & has_past, other=0.0)
        tl.store(base + i, tl.where(w >= WIDTH - 1, new.to(old.dtype), old), mask=cm)


def conv_prefill(x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Depthwise causal conv + SiLU over each sequence's new tokens, continuing from its slot's window (zeros for a
    new sequence), then the window moved to the sequence's last inputs. x [tokens, channels] with rows of any stride."""
    tokens, channels = x.shape
    width = weight.shape[1]
    seqs = batch.num_seqs
    query_lens = batch.cu_seqlens.diff()
    token_seq = torch.repeat_interleave(torch.arange(seqs, device=x.device), query_lens, output_size=tokens)
    has_past = (batch.seq_lens > query_lens).to(torch.int32)
    out = torch.empty(tokens, channels, dtype=x.dtype, device=x.device)
    bt, bc = 32, 128
    _conv_prefill_kernel[(triton.cdiv(tokens, bt), triton.cdiv(channels, bc))](
        x, x.stride(0), weight, conv_states, out, token_seq, batch.cu_seqlens, batch.state_slots, has_past, tokens, channels,
        WIDTH=width, BT=bt, BC=bc,
    )
    _conv_state_kernel[(seqs, triton.cdiv(channels, bc))](
        x, x.stride(0), conv_states, batch.cu_seqlens, batch.state_slots, has_past, channels, WIDTH=width, BC=bc,
    )
    return out

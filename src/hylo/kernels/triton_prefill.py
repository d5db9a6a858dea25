"""Prefill kernels in Triton: many tokens per sequence, read from the flat batch without host syncs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hylo.batch import Batch
from hylo.kernels.triton_decode import gdn_token


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


@triton.jit
def _gdn_recurrent_kernel(q_ptr, q_row, k_ptr, k_row, v_ptr, v_row, a_ptr, a_row, b_ptr, b_row, a_log_ptr, dt_bias_ptr, state_ptr,
                          slots_ptr, starts_ptr, seq_lens_ptr, out_ptr, scale, max_len,
                          H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr):
    pid = tl.program_id(0)
    n, hv = pid // HV, pid % HV
    h = hv // (HV // H)  # each key head serves HV // H consecutive value heads
    ok = tl.arange(0, K)
    ov = tl.program_id(1) * BV + tl.arange(0, BV)
    start = tl.load(starts_ptr + n)
    length = tl.load(starts_ptr + n + 1) - start
    continues = tl.load(seq_lens_ptr + n) > length  # tokens cached by earlier steps: go on from the slot's state
    slot = tl.load(slots_ptr + n).to(tl.int64)
    p_state = state_ptr + ((slot * HV + hv) * K + ok[:, None]) * V + ov[None, :]
    state = tl.where(continues, tl.load(p_state), 0.0)
    a_log = tl.load(a_log_ptr + hv).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + hv).to(tl.float32)
    # A loop to the batch's longest sequence that works only up to this one's end: a bound loaded from memory would
    # serve as well compiled, but Triton's interpreter (the CPU tests) cannot loop to it. Skipped, not masked: a step
    # that prefills one long chunk beside many decode rows would otherwise have every row's programs walk its length.
    for i in range(0, max_len):
        if i < length:
            t = (start + i).to(tl.int64)
            out, state = gdn_token(
                tl.load(q_ptr + t * q_row + h * K + ok).to(tl.float32), tl.load(k_ptr + t * k_row + h * K + ok).to(tl.float32),
                tl.load(v_ptr + t * v_row + hv * V + ov).to(tl.float32), tl.load(a_ptr + t * a_row + hv).to(tl.float32),
                tl.load(b_ptr + t * b_row + hv).to(tl.float32), a_log, dt_bias, state, scale,
            )
            tl.store(out_ptr + (t * HV + hv) * V + ov, out.to(out_ptr.dtype.element_ty), mask=ov < V)
    tl.store(p_state, state)


def gdn_recurrent(q, k, v, a, b, a_log, dt_bias, states: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The gated delta rule token by token within each sequence, in one launch: q, k [tokens, H, K], v [tokens, HV, V],
    a and b [tokens, HV] (each may be a row view of a wider tensor); each sequence starts from its slot's state if it
    has cached tokens, else from zero, and leaves its last state there. Its time grows with the longest sequence (one
    token after another), fla-core's chunked kernels' with the tokens; it costs the host one launch where they cost
    about eight."""
    tokens, key_heads, k_dim = q.shape
    value_heads, v_dim = v.shape[1], v.shape[2]
    out = torch.empty(tokens, value_heads, v_dim, dtype=v.dtype, device=v.device)
    block_v = min(32, v_dim)
    _gdn_recurrent_kernel[(batch.num_seqs * value_heads, triton.cdiv(v_dim, block_v))](
        q, q.stride(0), k, k.stride(0), v, v.stride(0), a, a.stride(0), b, b.stride(0), a_log, dt_bias, states, batch.state_slots,
        batch.cu_seqlens, batch.seq_lens, out, k_dim**-0.5, max(batch.query_lens),
        H=key_heads, HV=value_heads, K=k_dim, V=v_dim, BV=block_v,
    )
    return out

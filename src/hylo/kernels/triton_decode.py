"""Decode-step kernels in Triton: every sequence adds one token to the state it already has.

Each reads the per-sequence indices (state slots, block tables, sequence lengths, KV slots) from
device tensors and never from host lists, so a decode step can be captured in a CUDA graph and
replayed. State is read and written in place, in its slot.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from hylo.batch import Batch


@triton.jit
def _conv_kernel(x_ptr, x_row, w_ptr, state_ptr, slots_ptr, out_ptr, channels,
                 WIDTH: tl.constexpr, WP: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cm = c < channels
    j = tl.arange(0, WP)  # past inputs, oldest first: WIDTH - 1 of them
    slot = tl.load(slots_ptr + n).to(tl.int64)
    base = state_ptr + slot * channels * (WIDTH - 1) + c[:, None] * (WIDTH - 1)
    past = tl.load(base + j[None, :], mask=cm[:, None] & (j[None, :] < WIDTH - 1), other=0.0).to(tl.float32)
    w_past = tl.load(w_ptr + c[:, None] * WIDTH + j[None, :], mask=cm[:, None] & (j[None, :] < WIDTH - 1), other=0.0).to(tl.float32)
    x = tl.load(x_ptr + n * x_row + c, mask=cm, other=0.0)
    acc = tl.sum(past * w_past, axis=1) + x.to(tl.float32) * tl.load(w_ptr + c * WIDTH + WIDTH - 1, mask=cm, other=0.0).to(tl.float32)
    tl.store(out_ptr + n * channels + c, (acc * tl.sigmoid(acc)).to(out_ptr.dtype.element_ty), mask=cm)
    shifted = tl.load(base + j[None, :] + 1, mask=cm[:, None] & (j[None, :] < WIDTH - 2), other=0.0)
    window = tl.where(j[None, :] == WIDTH - 2, x[:, None].to(shifted.dtype), shifted)
    tl.store(base + j[None, :], window, mask=cm[:, None] & (j[None, :] < WIDTH - 1))


def conv_decode(x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Depthwise causal conv + SiLU of one token per sequence, shifting its slot's window."""
    seqs, channels = x.shape
    width = weight.shape[1]
    out = torch.empty(seqs, channels, dtype=x.dtype, device=x.device)
    block = 256
    _conv_kernel[(seqs, triton.cdiv(channels, block))](
        x, x.stride(0), weight, conv_states, batch.state_slots, out, channels,
        WIDTH=width, WP=triton.next_power_of_2(width), BLOCK=block,
    )
    return out


@triton.jit
def gdn_token(q, k, v, a, b, a_log, dt_bias, state, scale):
    """One token of the gated delta rule on a float32 state tile [K, BV], gates computed here: q, k [K] and v [BV] as
    stored, a and b this value head's projections, a_log and dt_bias its parameters. Returns (output [BV], state)."""
    q = q * tl.rsqrt(tl.sum(q * q, axis=0) + 1e-6) * scale
    k = k * tl.rsqrt(tl.sum(k * k, axis=0) + 1e-6)
    a = a + dt_bias
    softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))
    state = state * tl.exp(-tl.exp(a_log) * softplus)
    delta = tl.sigmoid(b) * (v - tl.sum(state * k[:, None], axis=0))
    state = state + k[:, None] * delta[None, :]
    return tl.sum(state * q[:, None], axis=0), state


@triton.jit
def _gdn_kernel(q_ptr, q_row, k_ptr, k_row, v_ptr, v_row, a_ptr, a_row, b_ptr, b_row, a_log_ptr, dt_bias_ptr, state_ptr, slots_ptr, out_ptr,
                scale, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr):
    pid = tl.program_id(0)
    n, hv = pid // HV, pid % HV
    h = hv // (HV // H)  # each key head serves HV // H consecutive value heads
    ok = tl.arange(0, K)
    ov = tl.program_id(1) * BV + tl.arange(0, BV)
    slot = tl.load(slots_ptr + n).to(tl.int64)
    p_state = state_ptr + ((slot * HV + hv) * K + ok[:, None]) * V + ov[None, :]
    out, state = gdn_token(
        tl.load(q_ptr + n * q_row + h * K + ok).to(tl.float32), tl.load(k_ptr + n * k_row + h * K + ok).to(tl.float32),
        tl.load(v_ptr + n * v_row + hv * V + ov).to(tl.float32), tl.load(a_ptr + n * a_row + hv).to(tl.float32),
        tl.load(b_ptr + n * b_row + hv).to(tl.float32), tl.load(a_log_ptr + hv).to(tl.float32), tl.load(dt_bias_ptr + hv).to(tl.float32),
        tl.load(p_state), scale,
    )
    tl.store(out_ptr + (n * HV + hv) * V + ov, out.to(out_ptr.dtype.element_ty))
    tl.store(p_state, state)


def gdn_decode(q, k, v, a, b, a_log, dt_bias, states: torch.Tensor, batch: Batch) -> torch.Tensor:
    """One gated-delta-rule step per sequence with the gates computed inside: q, k [seqs, H, K], v [seqs, HV, V],
    a and b [seqs, HV]; each may be a row view of a wider tensor (heads and channels contiguous)."""
    seqs, key_heads, k_dim = q.shape
    value_heads, v_dim = v.shape[1], v.shape[2]
    out = torch.empty(seqs, value_heads, v_dim, dtype=v.dtype, device=v.device)
    block_v = min(32, v_dim)
    _gdn_kernel[(seqs * value_heads, triton.cdiv(v_dim, block_v))](
        q, q.stride(0), k, k.stride(0), v, v.stride(0), a, a.stride(0), b, b.stride(0), a_log, dt_bias, states, batch.state_slots,
        out, k_dim**-0.5,
        H=key_heads, HV=value_heads, K=k_dim, V=v_dim, BV=block_v,
    )
    return out


@triton.jit
def _attention_kernel(q_ptr, q_row, q_head, k_ptr, k_row, k_head, v_ptr, v_row, v_head, cache_ptr, cache_half, cache_slot, cache_head,
                      tables_ptr, tables_row, seq_lens_ptr, kv_slots_ptr, out_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr, scale, block_size,
                      GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, TILE: tl.constexpr, SPLITS: tl.constexpr,
                      SPLIT_MIN: tl.constexpr, IEEE: tl.constexpr):
    n = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    og = tl.arange(0, GP)
    od = tl.arange(0, D)
    gm = og < GROUP
    q = tl.load(q_ptr + n * q_row + (kvh * GROUP + og)[:, None] * q_head + od[None, :], mask=gm[:, None], other=0.0)
    k_new = tl.load(k_ptr + n * k_row + kvh * k_head + od)
    v_new = tl.load(v_ptr + n * v_row + kvh * v_head + od)
    qf = q.to(tl.float32)
    score_new = tl.sum(qf * k_new.to(tl.float32)[None, :], axis=1) * scale
    # Split 0 also holds this token: its key and value go to its cache slot for later steps, and are used from
    # registers now. Each split starts its running softmax from that token or from nothing.
    first = split == 0
    if first:
        kv_slot = tl.load(kv_slots_ptr + n).to(tl.int64)
        tl.store(cache_ptr + kv_slot * cache_slot + kvh * cache_head + od, k_new.to(cache_ptr.dtype.element_ty))
        tl.store(cache_ptr + cache_half + kv_slot * cache_slot + kvh * cache_head + od, v_new.to(cache_ptr.dtype.element_ty))
    m = tl.where(first, score_new, float("-inf"))
    l = tl.where(first, 1.0, 0.0) + tl.zeros([GP], tl.float32)
    acc = tl.where(first, 1.0, 0.0) * v_new.to(tl.float32)[None, :] + tl.zeros([GP, D], tl.float32)
    # The cached tokens in SPLITS chunks of at least SPLIT_MIN, so a short context stays in few programs.
    cached = tl.load(seq_lens_ptr + n) - 1
    chunk = tl.cdiv(tl.cdiv(cached, SPLITS), SPLIT_MIN) * SPLIT_MIN
    lo = split * chunk
    hi = tl.minimum(cached, lo + chunk)
    for start in tl.range(lo, hi, TILE):
        pos = start + tl.arange(0, TILE)
        pm = pos < hi
        block = tl.load(tables_ptr + n * tables_row + pos // block_size, mask=pm, other=0).to(tl.int64)
        offsets = (block * block_size + pos % block_size) * cache_slot + kvh * cache_head
        keys = tl.load(cache_ptr + offsets[:, None] + od[None, :], mask=pm[:, None], other=0.0)
        values = tl.load(cache_ptr + cache_half + offsets[:, None] + od[None, :], mask=pm[:, None], other=0.0)
        if IEEE:
            scores = tl.dot(q.to(keys.dtype), tl.trans(keys), input_precision="ieee") * scale
        else:
            scores = tl.dot(q.to(keys.dtype), tl.trans(keys)) * scale
        scores = tl.where(pm[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)  # 0 where m is still -inf: every tile holds at least one cached token
        l = l * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values)
        m = m_new
    rows = n * GROUP * tl.num_programs(1) + kvh * GROUP + og  # out is [seqs, q_heads, D], contiguous
    if SPLITS == 1:
        tl.store(out_ptr + rows[:, None] * D + od[None, :], (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=gm[:, None])
    else:
        parts = rows * SPLITS + split  # partials are [seqs, q_heads, SPLITS (, D)]
        tl.store(part_max_ptr + parts, m, mask=gm)
        tl.store(part_sum_ptr + parts, l, mask=gm)
        tl.store(part_acc_ptr + parts[:, None] * D + od[None, :], acc, mask=gm[:, None])


@triton.jit
def _combine_kernel(part_max_ptr, part_sum_ptr, part_acc_ptr, out_ptr, SPLITS: tl.constexpr, D: tl.constexpr):
    row = tl.program_id(0)  # one (sequence, query head)
    o_split = tl.arange(0, SPLITS)
    od = tl.arange(0, D)
    m = tl.load(part_max_ptr + row * SPLITS + o_split)
    weight = tl.exp(m - tl.max(m, axis=0))  # split 0 is never empty, so the max is finite; empty splits weigh 0
    total = tl.sum(weight * tl.load(part_sum_ptr + row * SPLITS + o_split), axis=0)
    acc = tl.load(part_acc_ptr + (row * SPLITS + o_split)[:, None] * D + od[None, :])
    tl.store(out_ptr + row * D + od, (tl.sum(weight[:, None] * acc, axis=0) / total).to(out_ptr.dtype.element_ty))


SPLIT_MIN_TOKENS = 256  # below this a chunk's own loads cost less than combining it with others


@functools.cache
def _target_programs(device: torch.device) -> int:
    """Two programs per streaming multiprocessor (64 under Triton's CPU interpreter)."""
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 64


def attention_splits(seqs: int, kv_heads: int, device: torch.device) -> int:
    """How many chunks each sequence's context is cut into (flash-decoding): enough programs to fill the GPU
    twice over when the batch alone would not. Chosen from the batch shape only, so a captured graph keeps it."""
    wanted = _target_programs(device) // (seqs * kv_heads)
    return min(64, triton.next_power_of_2(wanted)) if wanted > 1 else 1


def paged_attention_decode(q, k, v, kv_cache: torch.Tensor, batch: Batch, scale: float, splits: int | None = None) -> torch.Tensor:
    """q [seqs, q_heads, D], k and v [seqs, kv_heads, D]: writes k, v to their slots, attends over each sequence.
    `splits` (a power of two) overrides `attention_splits`."""
    seqs, q_heads, head_dim = q.shape
    block_size, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = q_heads // kv_heads
    splits = splits or attention_splits(seqs, kv_heads, q.device)
    out = torch.empty(seqs, q_heads, head_dim, dtype=q.dtype, device=q.device)
    part_max = part_sum = part_acc = out  # unused when there is one split
    if splits > 1:
        part_max = torch.empty(seqs, q_heads, splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(seqs, q_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    _attention_kernel[(seqs, kv_heads, splits)](
        q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1),
        kv_cache, kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3),
        batch.block_tables, batch.block_tables.stride(0), batch.seq_lens, batch.slot_mapping, out, part_max, part_sum, part_acc,
        scale, block_size, GROUP=group, GP=max(16, triton.next_power_of_2(group)), D=head_dim, TILE=32, SPLITS=splits,
        SPLIT_MIN=SPLIT_MIN_TOKENS, IEEE=q.dtype == torch.float32,
    )
    if splits > 1:
        _combine_kernel[(seqs * q_heads,)](part_max, part_sum, part_acc, out, SPLITS=splits, D=head_dim)
    return out

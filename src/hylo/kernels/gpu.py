"""The CUDA path of each state-carrying operation: a decode step goes to the Triton kernels (graph-safe), a
prefill to flash attention's varlen kernel, fla-core's chunked gated delta rule and the Triton prefill conv. No
prefill path reads a device tensor back to the host: each such read would leave the GPU idle.

Triton and fla are imported at first use, so this module also imports where they are absent.
"""

from __future__ import annotations

import importlib.util
import itertools

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from hylo.batch import GDN_CHUNK, Batch
from hylo.kernels import reference

HAS_FLA = importlib.util.find_spec("fla") is not None
# Up to this many tokens in a step, GDN's prefill runs token by token in one launch: a small prefill is bound by the
# host's launches (fla-core's chunked path takes about eight per layer, 1.0-1.3 ms of host time), and the recurrent
# kernel's time grows with the tokens each of its programs walks. Whole generate(max_tokens=1), 9B shape, one H200,
# recurrent / chunked: batch 1 × 16-512 tokens 0.40-0.58; 1,024 tokens in all (2 × 512 ... 16 × 64) 0.58-0.85;
# 2,048 in all (4 × 512, 8 × 256, 16 × 128) 1.20-1.55. docs/benchmarks.md has the table.
RECURRENT_PREFILL_TOKENS = 1024


def paged_attention(q, k, v, kv_cache, batch: Batch, scale: float) -> torch.Tensor:
    if batch.is_decode:
        from hylo.kernels.triton_decode import paged_attention_decode

        return paged_attention_decode(q, k, v, kv_cache, batch, scale)
    return prefill_attention(q, k, v, kv_cache, batch, scale)


def causal_conv1d(x, weight, conv_states, batch: Batch) -> torch.Tensor:
    if batch.is_decode:
        from hylo.kernels.triton_decode import conv_decode

        return conv_decode(x, weight, conv_states, batch)
    from hylo.kernels.triton_prefill import conv_prefill

    return conv_prefill(x, weight, conv_states, batch)


def gated_delta_rule(q, k, v, a, b, a_log, dt_bias, states, batch: Batch) -> torch.Tensor:
    if batch.is_decode:
        from hylo.kernels.triton_decode import gdn_decode

        return gdn_decode(q, k, v, a, b, a_log, dt_bias, states, batch)
    if sum(batch.query_lens) <= RECURRENT_PREFILL_TOKENS:
        from hylo.kernels.triton_prefill import gdn_recurrent

        return gdn_recurrent(q, k, v, a, b, a_log, dt_bias, states, batch)
    if not HAS_FLA:
        return reference.gated_delta_rule(q, k, v, a, b, a_log, dt_bias, states, batch)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    g, beta = reference.gdn_gates(a, b, a_log, dt_bias)
    slots = batch.state_slots
    fresh = batch.seq_lens == batch.cu_seqlens.diff()  # no cached tokens: starts from a zero state
    initial = states[slots].masked_fill(fresh[:, None, None, None], 0.0)  # [seqs, value_heads, k_dim, v_dim]
    out, final = chunk_gated_delta_rule(
        q[None], k[None], v[None], g=g[None], beta=beta[None].to(q.dtype), initial_state=initial, output_final_state=True,
        use_qk_l2norm_in_kernel=True, cu_seqlens=batch.cu_seqlens, chunk_indices=batch.gdn_chunk_indices, chunk_size=GDN_CHUNK,
    )
    states[slots] = final.float()
    return out[0]


def prefill_attention(q, k, v, kv_cache, batch: Batch, scale: float) -> torch.Tensor:
    """Each sequence's new tokens attend to its cached tokens and causally to each other. The cache is written
    first, so a sequence that continues (a chunked prefill) reads its history from its blocks; a fresh one uses
    this step's keys directly. In half precision on a GPU, all sequences go to flash attention's varlen kernel in
    one call; otherwise (float32 or a head size flash attention does not take; the CPU) each sequence goes to SDPA."""
    flat = reference.write_kv(k, v, kv_cache, batch)
    head_dim = q.shape[-1]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256:
        return _varlen_attention(q, k, v, flat, kv_cache.shape[2], batch, scale)
    block_size, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = q.shape[1] // kv_heads
    out = torch.empty_like(q)
    starts = _starts(batch)
    for i, (n, context) in enumerate(zip(batch.query_lens, batch.context_lens)):
        s = slice(starts[i], starts[i] + n)
        mask = None
        if context == 0:
            keys, values = k[s], v[s]
        else:
            pos = torch.arange(context + n, device=q.device)
            slots = batch.block_tables[i, pos // block_size] * block_size + pos % block_size
            keys, values = flat[0, slots].to(q.dtype), flat[1, slots].to(q.dtype)
            # Query j sits at position context + j and attends to keys 0..context + j: causal from the lower right. Given
            # as a bias object, SDPA can take its flash kernel; a boolean [n, context + n] mask rules flash out and is
            # materialized (256 Mi entries for an 8k chunk at 32k context).
            mask = causal_lower_right(n, context + n)
        # [1, heads, tokens, head_dim]: SDPA's fused kernels take 4-D inputs only (3-D ones fall back to float32 math).
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)[None]
        values = values.repeat_interleave(group, dim=1).transpose(0, 1)[None]
        attended = F.scaled_dot_product_attention(q[s].transpose(0, 1)[None], keys, values, attn_mask=mask, is_causal=mask is None, scale=scale)
        out[s] = attended[0].transpose(0, 1)
    return out


def _varlen_attention(q, k, v, flat: torch.Tensor, block_size: int, batch: Batch, scale: float) -> torch.Tensor:
    """One launch for the whole step, where SDPA takes one per sequence (and a 16-prompt prefill was bound by those
    launches). Flash attention's causal mask is aligned to the lower right of each sequence's (queries, keys), as a
    continuing sequence needs, and it reads grouped key heads as they are."""
    cu_q, cu_k = batch.attention_cu_seqlens
    keys = sum(batch.context_lens) + q.shape[0]
    if keys > q.shape[0]:  # some sequences continue: every sequence's keys are gathered from its blocks
        rows = torch.repeat_interleave(torch.arange(batch.num_seqs, device=q.device), cu_k.diff(), output_size=keys)
        positions = torch.arange(keys, device=q.device) - cu_k[rows]
        slots = batch.block_tables[rows, positions // block_size] * block_size + positions % block_size
        k, v = flat[0, slots].to(q.dtype), flat[1, slots].to(q.dtype)
    longest = max(c + n for c, n in zip(batch.context_lens, batch.query_lens))
    return torch.ops.aten._flash_attention_forward(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, max(batch.query_lens), longest, 0.0, True, False, scale=scale
    )[0]


def _starts(batch: Batch) -> list[int]:
    """cu_seqlens from the host's lists: reading the device tensor would wait for the GPU."""
    return [0, *itertools.accumulate(batch.query_lens)]

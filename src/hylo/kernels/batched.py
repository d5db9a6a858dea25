"""Decode steps without per-sequence Python loops (pure torch): the GPU path where no library kernel is used.

Each function handles a step in which every sequence adds one token to existing state, and hands
any other step to the reference; `tests/kernels` checks both against each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hylo.batch import Batch
from hylo.kernels import reference


def paged_attention(q, k, v, kv_cache, batch: Batch, scale: float) -> torch.Tensor:
    if all(c == 0 for c in batch.context_lens):
        return _prefill_from_empty(q, k, v, kv_cache, batch, scale)
    if not batch.is_decode:
        return reference.paged_attention(q, k, v, kv_cache, batch, scale)
    flat = reference.write_kv(k, v, kv_cache, batch)
    _, _, block_size, kv_heads, head_dim = kv_cache.shape
    lengths = batch.positions + 1  # [seqs]: one token each, at its position
    longest = max(batch.context_lens) + 1
    pos = torch.arange(longest, device=q.device)
    slots = batch.block_tables[:, pos // block_size] * block_size + pos % block_size  # [seqs, longest]
    keys, values = flat[0][slots].to(q.dtype), flat[1][slots].to(q.dtype)  # [seqs, longest, kv_heads, head_dim]
    qg = q.view(q.shape[0], kv_heads, -1, head_dim)  # [seqs, kv_heads, group, head_dim]
    scores = torch.einsum("skgd,slkd->skgl", qg.float(), keys.float()) * scale
    scores = scores.masked_fill((pos[None, :] >= lengths[:, None])[:, None, None, :], float("-inf"))
    out = torch.einsum("skgl,slkd->skgd", scores.softmax(dim=-1).to(q.dtype), values)
    return out.reshape(q.shape)


def causal_conv1d(x, weight, conv_states, batch: Batch) -> torch.Tensor:
    if not batch.is_decode:
        return reference.causal_conv1d(x, weight, conv_states, batch)
    slots = batch.state_slots
    window = torch.cat([conv_states[slots].to(x.dtype), x[:, :, None]], dim=-1)  # [seqs, channels, kernel]
    conv_states[slots] = window[:, :, 1:].to(conv_states.dtype)
    return F.silu((window.to(weight.dtype) * weight).sum(-1)).to(x.dtype)


def _prefill_from_empty(q, k, v, kv_cache, batch: Batch, scale: float) -> torch.Tensor:
    """Every sequence starts here: causal attention over its own tokens (SDPA's fused kernels), cache written."""
    reference.write_kv(k, v, kv_cache, batch)
    group = q.shape[1] // kv_cache.shape[3]
    out = torch.empty_like(q)
    starts = batch.cu_seqlens.tolist()
    for i, n in enumerate(batch.query_lens):
        s = slice(starts[i], starts[i] + n)
        qi = q[s].transpose(0, 1)  # [heads, tokens, head_dim]
        ki = k[s].repeat_interleave(group, dim=1).transpose(0, 1)
        vi = v[s].repeat_interleave(group, dim=1).transpose(0, 1)
        out[s] = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale).transpose(0, 1)
    return out

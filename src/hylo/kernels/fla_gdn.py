"""The gated delta rule through fla-core's Triton kernels (chunked for prefill, fused recurrent for decode)."""

from __future__ import annotations

import torch

from hylo.batch import Batch


def gated_delta_rule(q, k, v, g, beta, states, batch: Batch) -> torch.Tensor:
    """Same contract as `reference.gated_delta_rule`: varlen tokens, states read from and written to slots."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    slots = batch.state_slots
    fresh = torch.tensor([c == 0 for c in batch.context_lens], device=q.device)
    initial = states[slots].masked_fill(fresh[:, None, None, None], 0.0)  # [seqs, value_heads, k_dim, v_dim]
    kernel = fused_recurrent_gated_delta_rule if batch.is_decode else chunk_gated_delta_rule
    out, final = kernel(
        q[None], k[None], v[None], g=g[None].float(), beta=beta[None].to(q.dtype),  # by name: the two kernels order them differently
        initial_state=initial, output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=batch.cu_seqlens,
    )
    states[slots] = final.float()
    return out[0]

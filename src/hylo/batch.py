"""What one forward step computes: a flat list of tokens from several sequences, and where their state lives."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """Tokens of all scheduled sequences, concatenated: sequence i owns tokens cu_seqlens[i]:cu_seqlens[i+1].

    For each sequence, `context_lens` tokens are already in its caches (earlier steps or prefill
    chunks); this step adds `query_lens` more. `state_slots` index the GDN state pool and
    `block_tables`/`slot_mapping` the paged KV cache of full-attention layers.
    """

    input_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    query_lens: list[int]
    context_lens: list[int]
    cu_seqlens: torch.Tensor  # [seqs + 1]
    state_slots: torch.Tensor  # [seqs]
    block_tables: torch.Tensor  # [seqs, max_blocks]
    slot_mapping: torch.Tensor  # [tokens]: flat index into (num_blocks * block_size)
    logits_indices: torch.Tensor  # [sampled seqs]: token whose logits are sampled

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token on top of existing state."""
        return all(q == 1 for q in self.query_lens) and all(c > 0 for c in self.context_lens)

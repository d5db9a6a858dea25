"""The paged KV-block allocator and the GDN state-slot pool, and sizing both from a memory budget."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from hylo.state import CacheShapes, CacheTensors

log = logging.getLogger("hylo")


class FreeList:
    """Ids 0..size-1 handed out and taken back (KV blocks, GDN state slots); lowest ids first."""

    def __init__(self, size: int):
        self.size = size
        self.free_ids = list(range(size - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def take(self, n: int) -> list[int] | None:
        """n ids, or None (and nothing taken) when fewer are free."""
        if n > len(self.free_ids):
            return None
        return [self.free_ids.pop() for _ in range(n)]

    def give(self, ids: list[int]) -> None:
        self.free_ids.extend(reversed(ids))


@dataclass(frozen=True)
class CachePlan:
    """`num_blocks` KV blocks and `num_slots` GDN state slots for sequences, plus one more of each that no
    sequence gets: the rows a CUDA graph pads a batch with write there (`pad_block`, `pad_slot`)."""

    num_blocks: int
    num_slots: int

    @property
    def pad_block(self) -> int:
        return self.num_blocks

    @property
    def pad_slot(self) -> int:
        return self.num_slots

    @staticmethod
    def fit(shapes: CacheShapes, budget: int, block_size: int, max_model_len: int, max_num_seqs: int, dtype: torch.dtype) -> CachePlan:
        """GDN slots for up to max_num_seqs sequences (at most half the budget), KV blocks from the rest."""
        block, slot = shapes.block_bytes(block_size, dtype), shapes.slot_bytes(dtype)
        budget -= block + slot  # the padding block and slot
        blocks_per_seq = -(-max_model_len // block_size)
        num_slots = min(max_num_seqs, max(1, budget // 2 // max(slot, 1)))
        num_blocks = (budget - num_slots * slot) // max(block, 1) if block else blocks_per_seq * num_slots
        if num_blocks < blocks_per_seq or num_slots < 1:
            need = slot + blocks_per_seq * block
            raise ValueError(
                f"the KV/state cache budget of {budget / 2**20:.1f} MiB cannot hold one sequence of max_model_len="
                f"{max_model_len} ({need / 2**20:.1f} MiB needed); raise kv_cache_memory_bytes / gpu_memory_utilization "
                f"or lower max_model_len"
            )
        plan = CachePlan(int(num_blocks), int(num_slots))
        log.info(
            "cache: %d KV blocks of %d tokens (%.1f MiB) and %d GDN state slots (%.1f MiB)",
            plan.num_blocks, block_size, plan.num_blocks * block / 2**20, plan.num_slots, plan.num_slots * slot / 2**20,
        )
        return plan

    def allocate(self, shapes: CacheShapes, block_size: int, dtype: torch.dtype, device: torch.device) -> CacheTensors:
        s = shapes
        return CacheTensors(
            kv=[torch.zeros(2, self.num_blocks + 1, block_size, s.kv_heads, s.head_dim, dtype=dtype, device=device) for _ in range(s.num_attention_layers)],
            conv=[torch.zeros(self.num_slots + 1, s.conv_channels, s.conv_width, dtype=dtype, device=device) for _ in range(s.num_gdn_layers)],
            recurrent=[torch.zeros(self.num_slots + 1, s.value_heads, s.k_dim, s.v_dim, dtype=torch.float32, device=device) for _ in range(s.num_gdn_layers)],
        )

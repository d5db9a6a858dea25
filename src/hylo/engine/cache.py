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


SNAPSHOT_SHARE = 4  # with prefix caching, GDN snapshots get 1/4 of what the state slots leave (docs/architecture.md)


@dataclass(frozen=True)
class CachePlan:
    """`num_blocks` KV blocks and `num_slots` GDN state slots for sequences, plus one more of each that no
    sequence gets: the rows a CUDA graph pads a batch with write there (`pad_block`, `pad_slot`). With prefix
    caching, `num_snapshots` entries of GDN state (every layer's, at a block boundary) as well."""

    num_blocks: int
    num_slots: int
    num_snapshots: int = 0

    @property
    def pad_block(self) -> int:
        return self.num_blocks

    @property
    def pad_slot(self) -> int:
        return self.num_slots

    @staticmethod
    def fit(shapes: CacheShapes, budget: int, block_size: int, max_model_len: int, max_num_seqs: int, dtype: torch.dtype,
            prefix_caching: bool = False) -> CachePlan:
        """GDN slots for up to max_num_seqs sequences (at most half the budget), then with prefix caching
        1/SNAPSHOT_SHARE of the rest for snapshots, KV blocks from what remains."""
        block, slot = shapes.block_bytes(block_size, dtype), shapes.slot_bytes(dtype)
        budget -= block + slot  # the padding block and slot
        blocks_per_seq = -(-max_model_len // block_size)
        num_slots = min(max_num_seqs, max(1, budget // 2 // max(slot, 1)))
        num_snapshots = (budget - num_slots * slot) // SNAPSHOT_SHARE // max(slot, 1) if prefix_caching else 0
        rest = budget - (num_slots + num_snapshots) * slot
        num_blocks = rest // max(block, 1) if block else blocks_per_seq * num_slots
        if num_blocks < blocks_per_seq or num_slots < 1:
            need = slot + blocks_per_seq * block
            raise ValueError(
                f"the KV/state cache budget of {budget / 2**20:.1f} MiB cannot hold one sequence of max_model_len="
                f"{max_model_len} ({need / 2**20:.1f} MiB needed); raise kv_cache_memory_bytes / gpu_memory_utilization "
                f"or lower max_model_len"
            )
        if prefix_caching and num_snapshots < 1:
            raise ValueError(
                f"the KV/state cache budget of {budget / 2**20:.1f} MiB leaves no room for a GDN snapshot "
                f"({slot / 2**20:.1f} MiB), which prefix caching needs; raise kv_cache_memory_bytes / gpu_memory_utilization"
            )
        plan = CachePlan(int(num_blocks), int(num_slots), int(num_snapshots))
        log.info(
            "cache: %d KV blocks of %d tokens (%.1f MiB) and %d GDN state slots (%.1f MiB)%s",
            plan.num_blocks, block_size, plan.num_blocks * block / 2**20, plan.num_slots, plan.num_slots * slot / 2**20,
            f"; prefix caching: {plan.num_snapshots} GDN snapshots ({plan.num_snapshots * slot / 2**20:.1f} MiB)" if prefix_caching else "",
        )
        return plan

    @staticmethod
    def num_tensors(shapes: CacheShapes, prefix_caching: bool) -> int:
        """How many tensors `allocate` makes that hold bytes: KV per attention layer, conv and recurrent state per GDN
        layer, and their snapshot pools with prefix caching (empty without)."""
        return shapes.num_attention_layers + shapes.num_gdn_layers * (4 if prefix_caching else 2)

    def allocate(self, shapes: CacheShapes, block_size: int, dtype: torch.dtype, device: torch.device) -> CacheTensors:
        s = shapes
        return CacheTensors(
            kv=[torch.zeros(2, self.num_blocks + 1, block_size, s.kv_heads, s.head_dim, dtype=dtype, device=device) for _ in range(s.num_attention_layers)],
            conv=[torch.zeros(self.num_slots + 1, s.conv_channels, s.conv_width, dtype=dtype, device=device) for _ in range(s.num_gdn_layers)],
            recurrent=[torch.zeros(self.num_slots + 1, s.value_heads, s.k_dim, s.v_dim, dtype=torch.float32, device=device) for _ in range(s.num_gdn_layers)],
            conv_snapshots=[torch.zeros(self.num_snapshots, s.conv_channels, s.conv_width, dtype=dtype, device=device) for _ in range(s.num_gdn_layers)],
            recurrent_snapshots=[torch.zeros(self.num_snapshots, s.value_heads, s.k_dim, s.v_dim, dtype=torch.float32, device=device)
                                 for _ in range(s.num_gdn_layers)],
        )

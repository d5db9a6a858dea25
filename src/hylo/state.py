"""Per-sequence state kept between steps: its shapes on this rank and the tensors holding it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CacheTensors:
    """The engine's state pools, one entry per layer of each kind (in layer order)."""

    kv: list[torch.Tensor]  # per attention layer: [2, num_blocks, block_size, kv_heads, head_dim]
    conv: list[torch.Tensor]  # per GDN layer: [slots, channels, kernel - 1]
    recurrent: list[torch.Tensor]  # per GDN layer: [slots, value_heads, k_dim, v_dim] float32
    # Prefix caching's GDN snapshots, per GDN layer, shaped like conv / recurrent with one row per snapshot entry
    # (none without prefix caching).
    conv_snapshots: list[torch.Tensor]
    recurrent_snapshots: list[torch.Tensor]

    def restore_snapshots(self, pairs: list[tuple[int, int]]) -> None:
        """(snapshot entry, state slot): each slot resumes from its entry, in every GDN layer (this rank's shard)."""
        entries, slots = self._indices(pairs)
        for live, saved in zip(self.conv + self.recurrent, self.conv_snapshots + self.recurrent_snapshots):
            live[slots] = saved[entries]

    def save_snapshots(self, pairs: list[tuple[int, int]]) -> None:
        """(state slot, snapshot entry): each slot's state, as it is now, into its entry."""
        slots, entries = self._indices(pairs)
        for live, saved in zip(self.conv + self.recurrent, self.conv_snapshots + self.recurrent_snapshots):
            saved[entries] = live[slots]

    def _indices(self, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.recurrent[0].device
        return tuple(torch.tensor(column, dtype=torch.long, device=device) for column in zip(*pairs))


@dataclass(frozen=True)
class CacheShapes:
    """Per-rank shapes of one attention layer's block and one GDN layer's slot."""

    num_attention_layers: int
    num_gdn_layers: int
    kv_heads: int
    head_dim: int
    conv_channels: int
    conv_width: int  # kernel - 1 past inputs
    value_heads: int
    k_dim: int
    v_dim: int

    def block_bytes(self, block_size: int, dtype: torch.dtype) -> int:
        return self.num_attention_layers * 2 * block_size * self.kv_heads * self.head_dim * _size(dtype)

    def slot_bytes(self, dtype: torch.dtype) -> int:
        conv = self.conv_channels * self.conv_width * _size(dtype)
        recurrent = self.value_heads * self.k_dim * self.v_dim * 4  # float32: the state accumulates over the whole sequence
        return self.num_gdn_layers * (conv + recurrent)



def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

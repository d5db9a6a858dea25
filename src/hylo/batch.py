"""What one forward step computes: a flat list of tokens from several sequences, and where their state lives."""

from __future__ import annotations

import array
import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch



def device_tensor(data, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list on `device` without waiting for the device's queue: torch's blocking host-to-device copy synchronizes
    the stream, so the host would wait for the step already queued (async scheduling's overlap gone). On a GPU the
    values are staged in pinned memory and copied asynchronously (torch's pinned cache keeps the staging block until the
    copy has run)."""
    values = torch.tensor(data, dtype=dtype)
    return values.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else values


GDN_CHUNK = 64  # tokens per chunk of the chunked gated delta rule (fla-core's and the reference's)


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
    seq_lens: torch.Tensor  # [seqs]: context + query tokens, what attention reads after this step's writes
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

    @functools.cached_property
    def gdn_chunk_indices(self) -> torch.Tensor:
        """[chunks, 2]: (sequence, chunk within it) for each GDN_CHUNK-token chunk of the step, as fla's chunked kernels
        index them. Made once per step from the host's lists: left to fla, every layer would build them on the host and
        copy them with a blocking copy, which waits for the GPU's queue (at TP>1, for the other ranks too)."""
        pairs = [(seq, chunk) for seq, n in enumerate(self.query_lens) for chunk in range(-(-n // GDN_CHUNK))]
        return device_tensor(pairs, self.cu_seqlens.device).view(-1, 2)

    @functools.cached_property
    def attention_cu_seqlens(self) -> torch.Tensor:
        """[2, seqs + 1] int32, for flash attention's varlen prefill: where each sequence's queries start among the
        step's tokens, and where its keys (its cached tokens, then this step's) start among all keys. Made once per
        step from the host's lists."""
        keys = [c + n for c, n in zip(self.context_lens, self.query_lens)]
        return device_tensor([[0, *itertools.accumulate(self.query_lens)], [0, *itertools.accumulate(keys)]], self.cu_seqlens.device, torch.int32)


@dataclass
class StepInput:
    """One step as plain lists: built by the scheduler's side, sent to every rank, turned into a Batch there."""

    input_ids: list[int]
    positions: list[int]
    query_lens: list[int]
    context_lens: list[int]
    state_slots: list[int]
    block_tables: list[list[int]]
    slot_mapping: list[int]
    logits_indices: list[int]
    lora_slots: list[int]  # per sequence, -1 for the base model
    # Prefix caching: (snapshot entry, state slot) copied in before the forward, (state slot, snapshot entry) copied out
    # after it; every rank copies its own shard.
    snapshot_restores: list[tuple[int, int]] = field(default_factory=list)
    snapshot_saves: list[tuple[int, int]] = field(default_factory=list)
    # Async scheduling: (row of the last step's sampled tokens, position in input_ids) where input_ids holds a
    # placeholder for a token the host has not read back yet (engine/pending.py).
    pending: list[tuple[int, int]] = field(default_factory=list)

    def pack(self) -> array.array:
        """Every field in one int64 array (for the step channel): seven lengths, then the lists in a fixed order."""
        counts = [len(self.input_ids), len(self.query_lens), len(self.logits_indices), sum(map(len, self.block_tables)),
                  len(self.snapshot_restores), len(self.snapshot_saves), len(self.pending)]
        return array.array("q", itertools.chain(
            counts, self.input_ids, self.positions, self.slot_mapping, self.query_lens, self.context_lens, self.state_slots,
            self.lora_slots, map(len, self.block_tables), self.logits_indices, *self.snapshot_restores, *self.snapshot_saves,
            *self.pending, *self.block_tables,
        ))

    @staticmethod
    def unpack(packed: Sequence[int]) -> StepInput:
        tokens, seqs, sampled, _, restores, saves, pending = packed[:7].tolist()
        fields = packed[7:].tolist()
        sizes = [tokens] * 3 + [seqs] * 5 + [sampled, 2 * restores, 2 * saves, 2 * pending]
        parts, start = [], 0
        for size in sizes:
            parts.append(fields[start : start + size])
            start += size
        ids, positions, slot_mapping, query_lens, context_lens, state_slots, lora_slots, table_lens, logits_indices, *copies = parts
        tables = []
        for n in table_lens:
            tables.append(fields[start : start + n])
            start += n
        restore_pairs, save_pairs, pending_pairs = (list(zip(flat[::2], flat[1::2])) for flat in copies)
        return StepInput(ids, positions, query_lens, context_lens, state_slots, tables, slot_mapping, logits_indices, lora_slots,
                         restore_pairs, save_pairs, pending_pairs)

    @property
    def seq_lens(self) -> list[int]:
        """Per sequence, the tokens in its cache once this step has written its own."""
        return [c + q for c, q in zip(self.context_lens, self.query_lens)]

    def to_batch(self, device: torch.device) -> Batch:
        tensor = lambda x: device_tensor(x, device)  # noqa: E731
        width = max(len(t) for t in self.block_tables)
        cu = [0]
        for n in self.query_lens:
            cu.append(cu[-1] + n)
        return Batch(
            input_ids=tensor(self.input_ids),
            positions=tensor(self.positions),
            query_lens=self.query_lens,
            context_lens=self.context_lens,
            cu_seqlens=tensor(cu),
            seq_lens=tensor(self.seq_lens),
            state_slots=tensor(self.state_slots),
            block_tables=tensor([t + [0] * (width - len(t)) for t in self.block_tables]),
            slot_mapping=tensor(self.slot_mapping),
            logits_indices=tensor(self.logits_indices),
        )

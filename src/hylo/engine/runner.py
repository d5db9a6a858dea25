"""Turns a scheduled step into a `StepInput`: plain lists that every tensor-parallel rank receives."""

from __future__ import annotations

from hylo.batch import StepInput
from hylo.engine.scheduler import Scheduled


def prepare_step(step: list[Scheduled], block_size: int, prompt_positions: list[range] | None = None) -> StepInput:
    """`prompt_positions`: per item, the positions whose logits are wanted besides the sampled ones (prompt
    logprobs); their rows follow the sampled rows in `logits_indices`, in order."""
    ids, positions, slots, logits_indices, extra_indices = [], [], [], [], []
    for i, item in enumerate(step):
        seq, start = item.seq, item.seq.num_computed
        stop = start + item.num_tokens
        if prompt_positions is not None:
            extra_indices += [len(ids) + p - start for p in prompt_positions[i]]
        ids += seq.token_ids(start, stop)
        positions += range(start, stop)
        slots += [seq.block_ids[p // block_size] * block_size + p % block_size for p in range(start, stop)]
        if item.samples:
            logits_indices.append(len(ids) - 1)
    return StepInput(
        input_ids=ids,
        positions=positions,
        query_lens=[item.num_tokens for item in step],
        context_lens=[item.seq.num_computed for item in step],
        state_slots=[item.seq.state_slot for item in step],
        block_tables=[list(item.seq.block_ids) for item in step],
        slot_mapping=slots,
        logits_indices=logits_indices + extra_indices,
        lora_slots=[-1 if item.seq.lora_slot is None else item.seq.lora_slot for item in step],
        snapshot_restores=[(item.restore, item.seq.state_slot) for item in step if item.restore is not None],
        snapshot_saves=[(item.seq.state_slot, item.save) for item in step if item.save is not None],
    )

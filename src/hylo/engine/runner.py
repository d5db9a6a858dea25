"""Turns a scheduled step into batch tensors, runs the model, and returns the logits to sample from."""

from __future__ import annotations

import torch

from hylo.batch import Batch
from hylo.engine.scheduler import Scheduled
from hylo.layers.lora import LoRABatch
from hylo.models.qwen3_5 import Qwen3_5ForCausalLM
from hylo.state import CacheTensors


class Runner:
    def __init__(self, model: Qwen3_5ForCausalLM, caches: CacheTensors, block_size: int, device: torch.device, lora: LoRABatch | None = None):
        self.model = model
        self.lora = lora
        self.caches = caches
        self.block_size = block_size
        self.device = device

    def build_batch(self, step: list[Scheduled]) -> Batch:
        ids, positions, slots, logits_indices = [], [], [], []
        cu = [0]
        for item in step:
            seq, start = item.seq, item.seq.num_computed
            stop = start + item.num_tokens
            ids += seq.token_ids(start, stop)
            pos = range(start, stop)
            positions += pos
            slots += [seq.block_ids[p // self.block_size] * self.block_size + p % self.block_size for p in pos]
            cu.append(cu[-1] + item.num_tokens)
            if item.samples:
                logits_indices.append(cu[-1] - 1)
        width = max(len(item.seq.block_ids) for item in step)
        tables = [item.seq.block_ids + [0] * (width - len(item.seq.block_ids)) for item in step]
        tensor = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        return Batch(
            input_ids=tensor(ids),
            positions=tensor(positions),
            query_lens=[item.num_tokens for item in step],
            context_lens=[item.seq.num_computed for item in step],
            cu_seqlens=tensor(cu),
            state_slots=tensor([item.seq.state_slot for item in step]),
            block_tables=tensor(tables),
            slot_mapping=tensor(slots),
            logits_indices=tensor(logits_indices),
        )

    @torch.inference_mode()
    def execute(self, step: list[Scheduled]) -> torch.Tensor:
        """Run one step; logits [sampled sequences, vocab] float32, in the order of `step`'s sampling items."""
        batch = self.build_batch(step)
        if self.lora is not None:
            self._set_lora(step)
        hidden = self.model(batch, self.caches)
        return self.model.compute_logits(hidden)

    def _set_lora(self, step: list[Scheduled]) -> None:
        """Which slot each token uses; tokens without an adapter are in no group and get no LoRA work."""
        slots = [item.seq.lora_slot if item.seq.lora_slot is not None else -1 for item in step]
        token_slots = torch.tensor(slots, device=self.device).repeat_interleave(
            torch.tensor([item.num_tokens for item in step], device=self.device)
        )
        self.lora.token_slots = token_slots
        self.lora.groups = [(s, torch.where(token_slots == s)[0]) for s in sorted(set(slots) - {-1})]

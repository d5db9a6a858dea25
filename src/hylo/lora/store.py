"""One rank's adapter data: read adapters in host memory, and writing this rank's share into device slots."""

from __future__ import annotations

import torch
from torch import nn

from hylo.config import ModelConfig
from hylo.distributed import TPGroup
from hylo.layers.lora import LoRABatch, write_lora_part
from hylo.lora.adapter import Adapter, lora_targets, read_adapter
from hylo.lora.request import LoRARequest


class AdapterStore:
    def __init__(self, model: nn.Module, model_config: ModelConfig, max_loras: int, max_rank: int, tp: TPGroup):
        self.model = model
        self.model_config = model_config
        self.max_rank = max_rank
        self.tp = tp
        self.batch = LoRABatch()
        self.targets = lora_targets(model)
        self.layers = [m for m in model.modules() if hasattr(m, "lora_parts") and m.lora_parts()]
        for layer in self.layers:
            layer.enable_lora(max_loras, max_rank, self.batch, tp.size)
        self.adapters: dict[int, Adapter] = {}

    def register(self, request: LoRARequest) -> None:
        """Read and validate the adapter's folder (AdapterError if refused) and keep it in host memory."""
        self.adapters[request.lora_int_id] = read_adapter(request, self.model, self.model_config, self.max_rank)

    def forget(self, lora_id: int) -> None:
        self.adapters.pop(lora_id, None)

    @torch.no_grad()
    def load(self, slot: int, lora_id: int) -> None:
        self.clear(slot)
        for name, (a, b) in self.adapters[lora_id].weights.items():
            target = self.targets[name]
            a_view, b_view = target.layer.lora_views(slot, target.part)
            write_lora_part(target.part, a_view, b_view, a.to(a_view), b.to(b_view), self.tp.rank, self.tp.size)

    def clear(self, slot: int) -> None:
        for layer in self.layers:
            layer.clear_lora(slot)

    def set_step(self, lora_slots: list[int], query_lens: list[int], device: torch.device) -> None:
        """Which slot each token uses this step; tokens of base-model sequences join no group (no LoRA work)."""
        token_slots = torch.tensor(lora_slots, device=device).repeat_interleave(torch.tensor(query_lens, device=device))
        self.batch.token_slots = token_slots
        self.batch.groups = [(s, torch.where(token_slots == s)[0]) for s in sorted(set(lora_slots) - {-1})]

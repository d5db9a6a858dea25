"""Adapters on the device (`max_loras` slots) and in host memory (an LRU of `max_cpu_loras`).

A sequence holds its adapter's slot while it runs; a slot with no running sequence can be reloaded
with another adapter. Adapters referenced by queued or running requests stay in host memory.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import torch
from torch import nn

from hylo.config import ModelConfig
from hylo.distributed import TPGroup
from hylo.layers.lora import LoRABatch, write_lora_part
from hylo.lora.adapter import Adapter, lora_targets, read_adapter
from hylo.lora.peft_config import AdapterError
from hylo.lora.request import LoRARequest

log = logging.getLogger("hylo")


class LoRASlots:
    def __init__(self, model: nn.Module, model_config: ModelConfig, max_loras: int, max_rank: int, max_cpu_loras: int, tp: TPGroup):
        self.model = model
        self.model_config = model_config
        self.max_rank = max_rank
        self.max_cpu_loras = max_cpu_loras
        self.tp = tp
        self.batch = LoRABatch()
        self.targets = lora_targets(model)
        self.layers = [m for m in model.modules() if hasattr(m, "lora_parts") and m.lora_parts()]
        for layer in self.layers:
            layer.enable_lora(max_loras, max_rank, self.batch, tp.size)
        self.requests: dict[int, LoRARequest] = {}
        self.host: OrderedDict[int, Adapter] = OrderedDict()
        self.refs: dict[int, int] = {}  # queued or running sequences per adapter id
        self.slot_lora: list[int | None] = [None] * max_loras
        self.slot_users = [0] * max_loras
        self.slot_used_at = [0.0] * max_loras
        self.loads = 0

    # -- registry ---------------------------------------------------------------------------------

    def register(self, request: LoRARequest) -> None:
        """Know `request` (reading and validating its folder on first sight); AdapterError if refused."""
        known = self.requests.get(request.lora_int_id)
        if known is not None and known.lora_path != request.lora_path:
            raise AdapterError(
                f"lora_int_id {request.lora_int_id} is already '{known.lora_name}' ({known.lora_path}); "
                f"give '{request.lora_name}' its own id or remove the other first"
            )
        if request.lora_int_id not in self.host:
            self._store(read_adapter(request, self.model, self.model_config, self.max_rank))
        self.requests[request.lora_int_id] = request

    def remove(self, lora_id: int) -> bool:
        """Forget an adapter. Running sequences keep their slot until they finish; it is not reused for this id."""
        if self.requests.pop(lora_id, None) is None:
            return False
        self.host.pop(lora_id, None)
        for slot, held in enumerate(self.slot_lora):
            if held == lora_id and self.slot_users[slot] == 0:
                self._clear(slot)
        return True

    def list(self) -> list[LoRARequest]:
        return list(self.requests.values())

    def reference(self, lora_id: int, delta: int) -> None:
        self.refs[lora_id] = self.refs.get(lora_id, 0) + delta
        self._trim()

    # -- slots ------------------------------------------------------------------------------------

    def can_run(self, lora_id: int) -> bool:
        return lora_id in self.slot_lora or any(u == 0 for u in self.slot_users)

    def acquire(self, lora_id: int) -> int:
        """The slot holding `lora_id`, loading it into the least recently used free slot if needed."""
        if lora_id in self.slot_lora:
            slot = self.slot_lora.index(lora_id)
        else:
            free = [s for s, users in enumerate(self.slot_users) if users == 0]
            slot = min(free, key=lambda s: (self.slot_lora[s] is not None, self.slot_used_at[s]))
            self._load(slot, lora_id)
        self.slot_users[slot] += 1
        self.slot_used_at[slot] = time.monotonic()
        return slot

    def release(self, slot: int) -> None:
        self.slot_users[slot] -= 1
        held = self.slot_lora[slot]
        if self.slot_users[slot] == 0 and held is not None and held not in self.requests:
            self._clear(slot)  # its adapter was removed while this slot was in use

    def _load(self, slot: int, lora_id: int) -> None:
        start = time.perf_counter()
        adapter = self.host.get(lora_id)
        if adapter is None:  # fell out of host memory: read it again
            adapter = read_adapter(self.requests[lora_id], self.model, self.model_config, self.max_rank)
            self._store(adapter)
        self.host.move_to_end(lora_id)
        self._clear(slot)
        with torch.no_grad():
            for name, (a, b) in adapter.weights.items():
                target = self.targets[name]
                a_view, b_view = target.layer.lora_views(slot, target.part)
                write_lora_part(target.part, a_view, b_view, a.to(a_view), b.to(b_view), self.tp.rank, self.tp.size)
        self.slot_lora[slot] = lora_id
        self.loads += 1
        log.info("adapter %s into slot %d in %.1f ms", adapter.request.lora_name, slot, 1e3 * (time.perf_counter() - start))

    def _clear(self, slot: int) -> None:
        for layer in self.layers:
            layer.clear_lora(slot)
        self.slot_lora[slot] = None

    def _store(self, adapter: Adapter) -> None:
        lora_id = adapter.request.lora_int_id
        self.host[lora_id] = adapter
        self.host.move_to_end(lora_id)
        self._trim()

    def _trim(self) -> None:
        """Keep at most max_cpu_loras in host memory, least recently used first out; referenced ones stay."""
        idle = [i for i in self.host if self.refs.get(i, 0) == 0]
        while len(self.host) > self.max_cpu_loras and idle:
            del self.host[idle.pop(0)]

"""Which adapter is in which device slot, and which stay in host memory: the scheduler's side of LoRA.

A sequence holds its adapter's slot while it runs; a slot with no running sequence can be reloaded
with another adapter. At most `max_cpu_loras` adapters stay in host memory (least recently used out),
except those that queued or running requests still need. The data itself lives on every rank
(`AdapterStore`); this table tells the executor what to read, load, clear and forget.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from hylo.lora.peft_config import AdapterError
from hylo.lora.request import LoRARequest

log = logging.getLogger("hylo")


class LoRASlots:
    def __init__(self, executor, max_loras: int, max_cpu_loras: int):
        self.executor = executor
        self.max_cpu_loras = max_cpu_loras
        self.requests: dict[int, LoRARequest] = {}
        # Removed while queued or running sequences still use them: forgotten when the last one finishes.
        self.draining: dict[int, LoRARequest] = {}
        self.host: OrderedDict[int, None] = OrderedDict()  # ids read into host memory, least recent first
        self.refs: dict[int, int] = {}  # queued or running sequences per adapter id
        self.slot_lora: list[int | None] = [None] * max_loras
        self.slot_users = [0] * max_loras
        self.slot_used_at = [0.0] * max_loras
        self.pending: dict[int, int] = {}  # slot → adapter id the scheduler placed there, loaded by the engine's step
        self.load_seconds: list[float] = []  # one entry per slot load, read by the server's metrics

    def register(self, request: LoRARequest) -> None:
        """Know `request`, reading and validating its folder on every rank on first sight; AdapterError if refused."""
        known = self.requests.get(request.lora_int_id) or self.draining.get(request.lora_int_id)
        if known is not None and known.lora_path != request.lora_path:
            raise AdapterError(
                f"lora_int_id {request.lora_int_id} is already '{known.lora_name}' ({known.lora_path}); "
                f"give '{request.lora_name}' its own id or remove the other first"
            )
        if request.lora_int_id not in self.host:
            self._read(request)
        self.draining.pop(request.lora_int_id, None)
        self.requests[request.lora_int_id] = request

    def remove(self, lora_id: int) -> bool:
        """Forget an adapter. Sequences already queued or running with it finish with it; new requests cannot use it."""
        request = self.requests.pop(lora_id, None)
        if request is None:
            return False
        if self.refs.get(lora_id, 0):
            self.draining[lora_id] = request
        else:
            self._forget(lora_id)
        return True

    def list(self) -> list[LoRARequest]:
        return list(self.requests.values())

    def reference(self, lora_id: int, delta: int) -> None:
        self.refs[lora_id] = self.refs.get(lora_id, 0) + delta
        if self.refs[lora_id] == 0:
            del self.refs[lora_id]
            if self.draining.pop(lora_id, None) is not None:
                self._forget(lora_id)
        self._trim()

    def can_run(self, lora_id: int) -> bool:
        return lora_id in self.slot_lora or any(u == 0 for u in self.slot_users)

    def acquire(self, lora_id: int) -> int:
        """The slot holding `lora_id`, or the least recently used free slot, which `load_pending` then fills."""
        if lora_id in self.slot_lora:
            slot = self.slot_lora.index(lora_id)
        else:
            free = [s for s, users in enumerate(self.slot_users) if users == 0]
            slot = min(free, key=lambda s: (self.slot_lora[s] is not None, self.slot_used_at[s]))
            self.slot_lora[slot] = lora_id
            self.pending[slot] = lora_id
        self.slot_users[slot] += 1
        self.slot_used_at[slot] = time.monotonic()
        return slot

    def release(self, slot: int) -> None:
        self.slot_users[slot] -= 1

    def load_pending(self) -> dict[int, str]:
        """Load the adapters `acquire` placed into slots; adapter id → why it could not be (read again) for those that failed."""
        failed = {}
        for slot, lora_id in self.pending.items():
            try:
                self._load(slot, lora_id)
            except AdapterError as e:  # e.g. its folder changed after it fell out of host memory
                self.slot_lora[slot] = None
                failed[lora_id] = str(e)
        self.pending.clear()
        return failed

    def _load(self, slot: int, lora_id: int) -> None:
        start = time.perf_counter()
        request = self.requests.get(lora_id) or self.draining[lora_id]
        if lora_id not in self.host:  # fell out of host memory: read it again
            self._read(request)
        self.host.move_to_end(lora_id)
        self.executor.call("lora_load", slot, lora_id)
        self.load_seconds.append(time.perf_counter() - start)
        log.info("adapter %s into slot %d in %.1f ms", request.lora_name, slot, 1e3 * self.load_seconds[-1])

    def _forget(self, lora_id: int) -> None:
        if lora_id in self.host:
            del self.host[lora_id]
            self.executor.call("lora_forget", lora_id)
        for slot, held in enumerate(self.slot_lora):
            if held == lora_id:  # no sequence holds it: the last one has finished
                self.executor.call("lora_clear", slot)
                self.slot_lora[slot] = None

    def _read(self, request: LoRARequest) -> None:
        try:
            self.executor.call("lora_register", request)
        except Exception:
            self.executor.call("lora_forget", request.lora_int_id)  # a load that fails on one rank fails on all
            raise
        self.host[request.lora_int_id] = None
        self._trim()

    def _trim(self) -> None:
        idle = [i for i in self.host if self.refs.get(i, 0) == 0]
        while len(self.host) > self.max_cpu_loras and idle:
            lora_id = idle.pop(0)
            del self.host[lora_id]
            self.executor.call("lora_forget", lora_id)

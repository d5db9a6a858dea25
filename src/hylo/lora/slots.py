"""Which adapter is in which device slot, and which stay in host memory: the scheduler's side of LoRA.

A sequence holds its adapter's slot while it runs; a slot with no running sequence can be reloaded
with another adapter. At most `max_cpu_loras` adapters stay in host memory, those being read included
(least recently used out), except those that queued or running requests still need. Room is made before
a read starts, so that the read's pinned image takes the memory of the image it replaces (torch keeps
freed pinned memory for reuse) instead of pinning new memory: pinning 128 MiB was 57 of the 94 ms of a
9B adapter's read on an H200's host. A read asked for starts at the next `poll` (the start of the
engine's step), once the requests added with it are in: an adapter one of them needs is never the one
forgotten to make room. The data itself lives on every rank
(`AdapterStore`); this table tells the executor what to read, load, clear and forget. Reading a folder
happens on a thread of each rank's own, so a request for an adapter not yet in memory waits in the
queue while the others keep decoding.
"""

from __future__ import annotations

import itertools
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
        # Being read on every rank: id → (request, rank → None or why it was refused, for ranks done so far).
        self.reading: dict[int, tuple[LoRARequest, dict[int, str | None]]] = {}
        self.to_read: dict[int, LoRARequest] = {}  # asked for; read from the next poll on
        self.load_seconds: list[float] = []  # one entry per slot load, read by the server's metrics
        self.forget_when_read: set[int] = set()  # removed while being read, and no request needs them: dropped once read
        # Which read of its folder each adapter in host memory is: cached prefixes are keyed by it, so a folder read
        # again (changed, or another path under the same id) never meets entries computed with the old weights.
        self.generation: dict[int, int] = {}
        self._reads = itertools.count()

    def start(self, request: LoRARequest) -> bool:
        """Know `request`; True if it is in host memory already, else its folder is read and validated on every
        rank from the next `poll` on (a later `poll` tells when it is done). AdapterError at once if its id belongs
        to another folder."""
        lora_id = request.lora_int_id
        known = (self.requests.get(lora_id) or self.draining.get(lora_id) or self.to_read.get(lora_id)
                 or (self.reading[lora_id][0] if lora_id in self.reading else None))
        if known is not None and known.lora_path != request.lora_path:
            raise AdapterError(
                f"lora_int_id {lora_id} is already '{known.lora_name}' ({known.lora_path}); "
                f"give '{request.lora_name}' its own id or remove the other first"
            )
        if lora_id in self.host:
            self.host.move_to_end(lora_id)  # asked for: the last to go when room is made for others read meanwhile
            self.draining.pop(lora_id, None)
            self.requests[lora_id] = request
            return True
        self.forget_when_read.discard(lora_id)
        if lora_id in self.draining:  # removed while its folder is being read again, and now added back
            del self.draining[lora_id]
            self.requests[lora_id] = request
        if lora_id not in self.reading:
            self.to_read[lora_id] = request
        return False

    @property
    def busy(self) -> bool:
        """Whether a read is asked for or under way."""
        return bool(self.to_read or self.reading)

    def poll(self) -> dict[int, str | None]:
        """Reads that every rank has finished since the last poll: adapter id → None (it can serve) or why it was
        refused (the first rank's reason; every rank's copy is dropped)."""
        for lora_id, request in list(self.to_read.items()):  # room first, then the read
            del self.to_read[lora_id]
            self.reading[lora_id] = (request, {})
            self._trim()
            self.executor.call("lora_read_start", request)
        for rank, finished in enumerate(self.executor.call("lora_read_done")):
            for lora_id, why in finished.items():
                self.reading[lora_id][1][rank] = why
        done = {}
        for lora_id, (request, per_rank) in list(self.reading.items()):
            if len(per_rank) < self.executor.size:
                continue
            del self.reading[lora_id]
            why = next((w for w in per_rank.values() if w is not None), None)
            if why is not None or lora_id in self.forget_when_read:
                self.forget_when_read.discard(lora_id)
                self.executor.call("lora_forget", lora_id)
            else:
                if lora_id not in self.draining:  # removed while being read: it serves its queued requests, then goes
                    self.requests[lora_id] = request
                self.host[lora_id] = None
                self.generation[lora_id] = next(self._reads)
                self._trim()
            done[lora_id] = why
        return done

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

    def identity(self, lora_id: int) -> tuple[int, str, str, int]:
        """(id, name, path, read generation) of an adapter in host memory: what its cached prefixes are keyed by."""
        request = self.requests.get(lora_id) or self.draining[lora_id]
        return lora_id, request.lora_name, request.lora_path, self.generation[lora_id]

    def can_run(self, lora_id: int) -> bool:
        return lora_id in self.host and (lora_id in self.slot_lora or any(u == 0 for u in self.slot_users))

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

    def load_pending(self) -> None:
        """Write the adapters `acquire` placed into slots (each is in host memory: `can_run` saw to that)."""
        for slot, lora_id in self.pending.items():
            start = time.perf_counter()
            self.host.move_to_end(lora_id)
            self.executor.call("lora_load", slot, lora_id)
            self.load_seconds.append(time.perf_counter() - start)
            name = (self.requests.get(lora_id) or self.draining[lora_id]).lora_name
            log.info("adapter %s into slot %d in %.1f ms", name, slot, 1e3 * self.load_seconds[-1])
        self.pending.clear()

    def _forget(self, lora_id: int) -> None:
        if lora_id in self.reading or lora_id in self.to_read:  # its read goes on, on every rank: drop it when it ends
            self.forget_when_read.add(lora_id)
        if lora_id in self.host:
            del self.host[lora_id]
            del self.generation[lora_id]
            self.executor.call("lora_forget", lora_id)
        for slot, held in enumerate(self.slot_lora):
            if held == lora_id:  # no sequence holds it: the last one has finished
                self.executor.call("lora_clear", slot)
                self.slot_lora[slot] = None

    def _trim(self) -> None:
        idle = [i for i in self.host if self.refs.get(i, 0) == 0]
        while len(self.host) + len(self.reading) > self.max_cpu_loras and idle:
            lora_id = idle.pop(0)
            del self.host[lora_id]
            del self.generation[lora_id]
            self.executor.call("lora_forget", lora_id)

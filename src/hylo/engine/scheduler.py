"""Continuous batching with chunked prefill: which sequences run this step, and how many tokens each.

Running sequences come first (oldest first), then waiting ones while the token budget, the
sequence limit, state slots and KV blocks allow. When KV blocks run out, the newest running
sequence is preempted: it gives back its blocks and slot and is recomputed from its tokens later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from hylo.engine.cache import FreeList
from hylo.engine.sequence import Sequence, Status
from hylo.lora.slots import LoRASlots


@dataclass
class Scheduled:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed

    @property
    def samples(self) -> bool:
        """The step reaches the sequence's last token, so its logits give the next token."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(
        self, blocks: FreeList, slots: FreeList, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
        lora: LoRASlots | None = None,
    ):
        self.blocks = blocks
        self.slots = slots
        self.lora = lora
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Scheduled]:
        budget = self.max_num_batched_tokens
        out: list[Scheduled] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self._reserve(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                out.append(Scheduled(seq, n))
                budget -= n
                i += 1
        admitted = []
        for seq in self.waiting:
            if preempted or budget <= 0 or len(self.running) >= self.max_num_seqs or not self.slots.num_free:
                break
            if seq.lora_id is not None and not self.lora.can_run(seq.lora_id):
                continue  # every adapter slot is busy with others; later requests for loaded adapters may still run
            n = min(seq.num_tokens, budget)
            if not self._reserve(seq, n):
                break
            admitted.append(seq)
            seq.state_slot = self.slots.take(1)[0]
            if seq.lora_id is not None:
                seq.lora_slot = self.lora.acquire(seq.lora_id)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append(Scheduled(seq, n))
            budget -= n
        for seq in admitted:
            self.waiting.remove(seq)
        return out

    def finish(self, seq: Sequence) -> None:
        """Return a finished or aborted sequence's blocks and slot at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED

    def _reserve(self, seq: Sequence, n: int) -> bool:
        needed = -(-(seq.num_computed + n) // self.block_size) - len(seq.block_ids)
        if needed <= 0:
            return True
        blocks = self.blocks.take(needed)
        if blocks is None:
            return False
        seq.block_ids += blocks
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.blocks.give(seq.block_ids)
        seq.block_ids = []
        if seq.state_slot is not None:
            self.slots.give([seq.state_slot])
            seq.state_slot = None
        if seq.lora_slot is not None:
            self.lora.release(seq.lora_slot)
            seq.lora_slot = None

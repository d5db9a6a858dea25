"""Continuous batching with chunked prefill: which sequences run this step, and how many tokens each.

Running sequences come first (oldest first), then waiting ones while the token budget, the
sequence limit, state slots and KV blocks allow. When KV blocks run out, the newest running
sequence is preempted: it gives back its blocks and slot and is recomputed from its tokens later.
With prefix caching, a sequence is admitted at the longest prefix the cache holds for it (`PrefixCache`),
and cached blocks nobody uses are given up before any sequence is preempted (`CachedBlocks` counts them free).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from hylo.engine.block_hash import adapter_seed
from hylo.engine.cache import FreeList
from hylo.engine.cached_pools import CachedBlocks
from hylo.engine.prefix_cache import PrefixCache
from hylo.engine.sequence import Sequence, Status
from hylo.lora.slots import LoRASlots


class PendingPreemption(Exception):
    """A sequence that would be preempted has a token the host has not read yet (async scheduling): the engine reads
    the step in flight back, then schedules again. Nothing is preempted; blocks reserved so far stay reserved."""


@dataclass
class Scheduled:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed
    restore: int | None = None  # snapshot entry copied into the sequence's state slot before the step
    save: int | None = None  # snapshot entry its state slot is copied into after the step

    @property
    def samples(self) -> bool:
        """The step reaches the sequence's last token, so its logits give the next token."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(
        self, blocks: FreeList | CachedBlocks, slots: FreeList, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
        lora: LoRASlots | None = None, prefix: PrefixCache | None = None,
    ):
        self.blocks = blocks  # prefix.blocks with prefix caching
        self.prefix = prefix
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
        # Prompt-logprob rows of logits this step may add: the device memory kept for logits covers about
        # max_num_seqs rows (ModelWorker.cache_budget), and a full-vocabulary row is ~1 MB for Qwen3.5.
        logit_rows = self.max_num_seqs
        out: list[Scheduled] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.last_in_flight:  # it ends once its token in flight is read: nothing left to compute
                i += 1
                continue
            n = self._chunk(seq, min(seq.num_tokens - seq.num_computed, budget))
            n, logit_rows = self._cap_prompt_rows(seq, n, logit_rows)
            while not self._reserve(seq, n):
                victim = self.running[-1]
                if victim.pending:  # recomputing it needs that token
                    raise PendingPreemption
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                out.append(Scheduled(seq, n, save=self._plan_snapshot(seq, n)))
                budget -= n
                i += 1
        admitted = []
        for seq in self.waiting:
            if preempted or budget <= 0 or len(self.running) >= self.max_num_seqs or not self.slots.num_free:
                break
            if seq.lora_id is not None and not self.lora.can_run(seq.lora_id):
                continue  # every adapter slot is busy with others; later requests for loaded adapters may still run
            if self._waits_for_prefix(seq):
                continue  # a running sequence is computing the next block of its prompt: it will find it cached
            restore = self._admit_cached(seq)
            n = self._chunk(seq, min(seq.num_tokens - seq.num_computed, budget))
            n, logit_rows = self._cap_prompt_rows(seq, n, logit_rows)
            if not self._reserve(seq, n):
                self._release(seq)  # the cached blocks it was to share
                seq.num_computed = 0
                break
            if self.prefix is not None:
                self.prefix.count(seq)
            admitted.append(seq)
            seq.state_slot = self.slots.take(1)[0]
            if seq.lora_id is not None:
                seq.lora_slot = self.lora.acquire(seq.lora_id)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append(Scheduled(seq, n, restore, self._plan_snapshot(seq, n)))
            budget -= n
        for seq in admitted:
            self.waiting.remove(seq)
        return out

    def computed(self, step: list[Scheduled]) -> None:
        """The step ran and each sequence's num_computed counts its tokens: what it cached becomes findable."""
        if self.prefix is not None:
            self.prefix.computed([item.seq for item in step])

    def finish(self, seq: Sequence, publish: bool = False) -> None:
        """Return a finished or aborted sequence's blocks and slot at once; with `publish` (it ended by EOS, a stop or
        its length), its rolling GDN snapshot becomes findable."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq, publish)
        seq.status = Status.FINISHED

    def _waits_for_prefix(self, seq: Sequence) -> bool:
        return self.prefix is not None and self._uses_hits(seq) and self.prefix.waits(seq, self._seed(seq))

    def _admit_cached(self, seq: Sequence) -> int | None:
        """With prefix caching: start `seq`'s cache books, sharing the cached prefix it resumes from (unless it wants
        every prompt position's logits); the snapshot entry to restore, if any."""
        if self.prefix is None:
            return None
        return self.prefix.admit(seq, self._seed(seq), self._uses_hits(seq))

    def _seed(self, seq: Sequence) -> bytes:
        return adapter_seed(self.lora.identity(seq.lora_id) if seq.lora_id is not None else None)

    @staticmethod
    def _uses_hits(seq: Sequence) -> bool:
        return seq.params.prompt_logprobs is None  # those need the logits of every prompt position

    @staticmethod
    def _cap_prompt_rows(seq: Sequence, n: int, rows_left: int) -> tuple[int, int]:
        """A chunk of a prompt whose logprobs are wanted adds a row of logits per token: at most `rows_left` of them
        (at least one token, so that it moves on); the chunk's size, and the rows left for the step."""
        request = seq.request
        if seq.params.prompt_logprobs is None or seq.child != 0 or seq.num_computed >= len(request.prompt_ids) - 1:
            return n, rows_left
        n = min(n, max(1, rows_left))
        return n, rows_left - n

    def _chunk(self, seq: Sequence, n: int) -> int:
        return n if self.prefix is None else self.prefix.chunk(seq, n)

    def _plan_snapshot(self, seq: Sequence, n: int) -> int | None:
        return None if self.prefix is None else self.prefix.plan_snapshot(seq, n)

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

    def _release(self, seq: Sequence, publish: bool = False) -> None:
        self.blocks.give(seq.block_ids)
        seq.block_ids = []
        if seq.state_slot is not None:
            self.slots.give([seq.state_slot])
            seq.state_slot = None
        if seq.lora_slot is not None:
            self.lora.release(seq.lora_slot)
            seq.lora_slot = None
        if self.prefix is not None:
            self.prefix.forget(seq, publish)

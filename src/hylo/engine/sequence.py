"""One generated sequence (a request with n > 1 has n of them) and the request that owns it."""

from __future__ import annotations

import enum
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from hylo.engine.detokenizer import IncrementalDetokenizer
from hylo.outputs import Logprob
from hylo.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: list[int]
    sequences: list[Sequence] = field(default_factory=list)
    error: str | None = None  # why it failed on its own, if it did
    stop_ids: frozenset[int] = frozenset()  # params.stop_token_ids as a set: looked up after every token
    banned: list[int] = field(default_factory=list)  # eos and stop token ids, masked until min_tokens are out
    bad_words_ids: list[list[int]] = field(default_factory=list)  # params.bad_words tokenized (hylo.sampling masks them)
    grammar: Future | None = None  # its constraint being compiled, then compiled (engine.compile_grammar)
    # With params.prompt_logprobs: None for the first prompt token, then one entry per prompt position computed so far.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def finished(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.sequences)


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    child: int
    detokenizer: IncrementalDetokenizer
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose KV / GDN state is in the caches
    block_ids: list[int] = field(default_factory=list)
    state_slot: int | None = None
    lora_id: int | None = None  # the adapter this sequence runs with (None: base model)
    lora_slot: int | None = None  # its device slot while running
    grammar: Any = None  # an xgrammar GrammarMatcher for a constrained request: where its output is in the grammar
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    pending: int = 0  # tokens sampled on the device whose values the host has not read yet (async scheduling)
    last_in_flight: bool = False  # its pending token reaches a length limit: it ends when read back, and is not scheduled

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids) + self.pending

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens start..stop; a pending token (not read back yet) reads 0, and the step's inputs take it on the device."""
        prompt = self.request.prompt_ids
        known = (prompt[start:stop] if start < len(prompt) else []) + self.output_ids[max(0, start - len(prompt)) : max(0, stop - len(prompt))]
        return known + [0] * (stop - start - len(known))

"""What generate() returns, shaped like vLLM's RequestOutput / CompletionOutput."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop string or stop token that ended it
    # LLM.chat with LLM(reasoning_parser=...) / LLM(tool_call_parser=...) and tools: `text` split as the server's
    # message is (hylo.parsers). `text` stays the whole output.
    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list[dict] | None = None  # OpenAI's shape: {"id", "type": "function", "function": {"name", "arguments"}}

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    # Set when this request failed on its own (its sequences end with finish_reason "error"); the
    # rest of the batch is unaffected.
    error: str | None = None
    # With SamplingParams.prompt_logprobs (vLLM's shape): None for the first prompt token, then per prompt token a
    # dict token → Logprob holding it and the top prompt_logprobs tokens.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

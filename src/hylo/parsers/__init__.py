"""Parsers of chat output, named as vLLM names them: `--reasoning-parser qwen3`, `--tool-call-parser qwen3_coder`.

Used by the server's chat route and by `LLM.chat` alike; they work on text, so they need no special
tokens in the vocabulary and split the same way whatever the chunk boundaries.
"""

from __future__ import annotations

from hylo.parsers.chat_output import ChatOutputParser, Delta
from hylo.parsers.reasoning import Qwen3ReasoningParser, prompt_opens_thinking
from hylo.parsers.tool_calls import Qwen3CoderToolParser

REASONING_PARSERS = {"qwen3": Qwen3ReasoningParser}
TOOL_CALL_PARSERS = {"qwen3_coder": Qwen3CoderToolParser}


def check_parser_names(reasoning_parser: str | None, tool_call_parser: str | None) -> None:
    """ValueError naming the parsers hylo has, for a name it does not."""
    for flag, name, known in (("reasoning_parser", reasoning_parser, REASONING_PARSERS), ("tool_call_parser", tool_call_parser, TOOL_CALL_PARSERS)):
        if name is not None and name not in known:
            raise ValueError(f"{flag}={name!r} is not a parser hylo has; use one of: {', '.join(known)}")


def output_parser(
    reasoning_parser: str | None, prompt: str, enable_thinking: object = None,
    tool_call_parser: str | None = None, tools: list[dict] | None = None, max_calls: int | None = None,
) -> ChatOutputParser:
    """A parser for one choice of a chat whose rendered prompt is `prompt`; tool calls are parsed only when
    `tools` are given."""
    reasoning = REASONING_PARSERS[reasoning_parser](prompt_opens_thinking(prompt, enable_thinking)) if reasoning_parser else None
    calls = TOOL_CALL_PARSERS[tool_call_parser](tools, max_calls) if tool_call_parser and tools else None
    return ChatOutputParser(reasoning, calls)


__all__ = [
    "REASONING_PARSERS", "TOOL_CALL_PARSERS", "ChatOutputParser", "Delta", "Qwen3CoderToolParser", "Qwen3ReasoningParser",
    "check_parser_names", "output_parser", "prompt_opens_thinking",
]

"""One chat choice's output, split as the parsers say: reasoning, content and tool calls, streamed or whole.

`ChatOutputParser.feed(text)` takes the choice's new text and returns a `Delta`; `finish()` flushes what
was held back. The reasoning parser runs first; the tool-call parser reads only the answer (as vLLM's
server does). The pieces of every delta add up to `message()`, the non-streamed result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hylo.parsers.reasoning import Qwen3ReasoningParser
from hylo.parsers.tool_calls import Qwen3CoderToolParser


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI's delta.tool_calls pieces

    def openai(self) -> dict:
        """The fields of an OpenAI chat delta (vLLM's `reasoning` beside `reasoning_content`)."""
        out: dict = {}
        if self.reasoning:
            out["reasoning_content"] = out["reasoning"] = self.reasoning
        if self.content:
            out["content"] = self.content
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


class ChatOutputParser:
    def __init__(self, reasoning: Qwen3ReasoningParser | None = None, tools: Qwen3CoderToolParser | None = None):
        self.reasoning_parser, self.tool_parser = reasoning, tools
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: list[dict] = []  # whole tool calls, as they build up

    def feed(self, text: str, final: bool = False) -> Delta:
        """The delta for the choice's new text; `final`: the output ends with it (what was held back comes out)."""
        return self._parse(text, final)

    def finish(self) -> Delta:
        return self._parse("", final=True)

    @property
    def called(self) -> bool:
        return bool(self.calls)

    def message(self) -> dict:
        """The whole message's fields so far: content (None when there is none beside reasoning or tool
        calls, as vLLM), reasoning_content and reasoning when a reasoning parser runs, tool_calls when any."""
        content = "".join(self.content)
        reasoning = "".join(self.reasoning) or None
        out: dict = {"content": content or (None if reasoning is not None or self.calls else "")}
        if self.reasoning_parser is not None:
            out["reasoning_content"] = out["reasoning"] = reasoning
        if self.calls:
            out["tool_calls"] = [{**c, "function": dict(c["function"])} for c in self.calls]
        return out

    def _parse(self, text: str, final: bool) -> Delta:
        delta = Delta()
        if self.reasoning_parser is not None:
            delta.reasoning, answer = self.reasoning_parser.feed(text)
            if final:
                reasoning, rest = self.reasoning_parser.finish()
                delta.reasoning, answer = delta.reasoning + reasoning, answer + rest
        else:
            answer = text
        if self.tool_parser is None:
            delta.content = answer
        else:
            events = self.tool_parser.feed(answer)
            if final:
                events += self.tool_parser.finish()
            content = []
            for event in events:
                if event[0] == "content":
                    content.append(event[1])
                elif event[0] == "call":
                    _, index, call_id, name = event
                    self.calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": ""}})
                    delta.tool_calls.append({"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}})
                else:
                    _, index, piece = event
                    self.calls[index]["function"]["arguments"] += piece
                    last = delta.tool_calls[-1] if delta.tool_calls else None
                    if last is not None and last["index"] == index:
                        last["function"]["arguments"] += piece
                    else:
                        delta.tool_calls.append({"index": index, "function": {"arguments": piece}})
            delta.content = "".join(content)
        if delta.reasoning:
            self.reasoning.append(delta.reasoning)
        if delta.content:
            self.content.append(delta.content)
        return delta

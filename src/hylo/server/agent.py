"""The chat route's reasoning and tool-calling decisions for one request: what reaches the chat template,
and how each choice's output is parsed (hylo.parsers)."""

from __future__ import annotations

import json
from typing import Callable

from hylo.parsers import ChatOutputParser, output_parser, prompt_opens_thinking
from hylo.sampling import InvalidParam, SamplingParams
from hylo.structured.tool_calls import tool_call_constraint


def message_text(content: str | list[dict] | None) -> str:
    """A message's text; protocol.ChatMessage has already refused every part that is not {"type": "text", "text": str}."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part["text"] for part in content)


def template_message(m) -> dict:
    """A request message as chat templates read it: Qwen3.5's reads a tool call's `arguments` as a mapping
    (vLLM parses the JSON string too) and an assistant's thinking as `reasoning_content`."""
    out = {"role": m.role, "content": message_text(m.content)}
    if getattr(m, "tool_calls", None) is not None:
        out["tool_calls"] = [
            {"id": c.id, "type": c.type, "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)}}
            for c in m.tool_calls
        ]
    if getattr(m, "tool_call_id", None) is not None:
        out["tool_call_id"] = m.tool_call_id
    reasoning = getattr(m, "reasoning_content", None)
    reasoning = reasoning if reasoning is not None else getattr(m, "reasoning", None)
    if reasoning is not None:
        out["reasoning_content"] = reasoning
    return out


def request_tools(body, auto_tool_choice: bool) -> tuple[list[dict] | None, bool]:
    """(the tools for the chat template, whether the output is parsed for tool calls). tool_choice "none"
    shows the model its tools and parses nothing (OpenAI's meaning); "auto", the default with tools, needs
    a server started with --enable-auto-tool-choice (as vLLM); "required" and a named function are enforced
    (`constrain_tool_calls`), so they need only the tool-call parser."""
    tools = getattr(body, "tools", None)
    if not tools:
        return None, False
    choice = body.tool_choice or "auto"
    if choice == "auto" and not auto_tool_choice:
        raise InvalidParam("tool_choice", "tool_choice \"auto\" (the default with tools) needs a server started with "
                                          "--enable-auto-tool-choice; send tool_choice \"none\" to show the model its tools without calls")
    return [t.model_dump(exclude_unset=True) for t in tools], choice != "none"


def constrain(body, tools: list[dict] | None, prompt: str, params: SamplingParams, reasoning_parser: str | None) -> None:
    """Where the prompt leaves a thinking block open: with a reasoning parser, the request's own constraint
    (response_format...) holds from the end of the thinking on, as vLLM applies it. Then the grammar that
    enforces tool_choice "required", a named function, or `strict: true` tools' arguments (thinking first)."""
    thinking = prompt_opens_thinking(prompt, (body.chat_template_kwargs or {}).get("enable_thinking"))
    if params.structured_outputs is not None and reasoning_parser is not None and thinking:
        params.structured_outputs.after_thinking = True
    constraint = tool_call_constraint(tools, body.tool_choice or "auto", thinking, body.parallel_tool_calls is not False) if tools else None
    if constraint is None:
        return
    if params.structured_outputs is not None:
        raise InvalidParam("tool_choice", "tool_choice \"required\", a named function and strict tools are enforced by a grammar, and so is "
                                          "this request's structured output (response_format, structured_outputs or guided_*); give one of them")
    params.structured_outputs = constraint


def choice_parsers(
    reasoning_parser: str | None, tool_call_parser: str | None, prompt: str, body, tools: list[dict] | None, parse_tools: bool,
) -> Callable[[], ChatOutputParser] | None:
    """A factory of one parser per choice, or None when this request's output is plain content."""
    if reasoning_parser is None and not parse_tools:
        return None
    enable_thinking = (body.chat_template_kwargs or {}).get("enable_thinking")
    max_calls = 1 if body.parallel_tool_calls is False else None
    calls_by = tool_call_parser if parse_tools else None
    return lambda: output_parser(reasoning_parser, prompt, enable_thinking, calls_by, tools if parse_tools else None, max_calls)

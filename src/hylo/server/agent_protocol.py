"""The chat request's agent fields, taken only where the server runs the parser that gives them a meaning.

- `--tool-call-parser qwen3_coder`: `tools` (`strict: true` ones too), `tool_choice` ("none", "auto",
  "required" or a named function), `parallel_tool_calls`, assistant messages with `tool_calls` and `tool`
  messages with `tool_call_id`. "required", a named function and strict tools are enforced by constrained
  decoding (hylo.structured.tool_calls), not hoped for.
- `--reasoning-parser qwen3`: assistant messages with `reasoning_content` (or vLLM's `reasoning`), which
  is what a client sends back after a response that carried them.

A server without them uses protocol.ChatRequest, which refuses all of these by name.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from hylo.server.protocol import ROLES, Body, ChatMessage, ChatRequest, refuse, shown, what

# Names end up inside the template's XML (<function=NAME>) and are read back from the model's output.
TOOL_NAME = re.compile(r"[^\s<>{}\"'=]{1,128}")
TOOL_NAME_RULE = "1 to 128 characters, none of them whitespace, quotes, braces, angle brackets or ="


def function_name(value: str) -> str:
    if not TOOL_NAME.fullmatch(value):
        raise refuse([], f"a function name must be {TOOL_NAME_RULE}; got {shown(value)}")
    return value


class ToolFunction(Body):
    where = "a tool's function"

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # true: a call's arguments follow `parameters` (enforced by a grammar)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return function_name(value)


class Tool(Body):
    where = "a tool"

    type: str
    function: ToolFunction

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        if value != "function":
            raise refuse([], f"a tool's type must be \"function\" (the only kind hylo calls), not {shown(value)}")
        return value


class CalledFunction(Body):
    where = "a tool call's function"

    name: str
    arguments: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return function_name(value)

    @field_validator("arguments")
    @classmethod
    def _arguments(cls, value: str) -> str:
        if not value.strip():
            return "{}"  # no arguments
        try:
            parsed = json.loads(value)
        except ValueError as e:
            raise refuse([], f"arguments must be a JSON object in a string (as the response gave it); it is not JSON ({e})") from None
        if not isinstance(parsed, dict):
            raise refuse([], f"arguments must be a JSON object in a string, not {what(parsed)}")
        return value


class ToolCall(Body):
    where = "a tool call"

    id: str
    type: str = "function"
    function: CalledFunction

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        if value != "function":
            raise refuse([], f"a tool call's type must be \"function\", not {shown(value)}")
        return value


class AgentChatMessage(ChatMessage):
    """A chat message with the agent fields; a variant refuses those its server does not take (`not_supported`)."""

    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None

    @model_validator(mode="after")
    def _fields_fit_the_role(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise refuse(["tool_calls"], f"tool_calls belong to assistant messages, not to a {self.role} message")
        if self.role == "tool" and self.tool_call_id is None:
            raise refuse(["tool_call_id"], "a tool message needs tool_call_id: the id of the assistant's tool call it answers")
        if self.tool_call_id is not None and self.role != "tool":
            raise refuse(["tool_call_id"], f"tool_call_id belongs to tool messages, not to a {self.role} message")
        for key in ("reasoning_content", "reasoning"):
            if getattr(self, key) is not None and self.role != "assistant":
                raise refuse([key], f"{key} belongs to assistant messages, not to a {self.role} message")
        if self.reasoning_content is not None and self.reasoning is not None and self.reasoning_content != self.reasoning:
            raise refuse(["reasoning"], "reasoning and reasoning_content differ; send one of them")
        return self


class AgentChatRequest(ChatRequest):
    tools: list[Tool] | None = None
    tool_choice: str | dict | None = None

    @field_validator("tool_choice", mode="plain")
    @classmethod
    def _tool_choice(cls, value: Any) -> str | dict | None:
        if value is None or value in ("none", "auto", "required"):
            return value
        if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
            function = value["function"]
            if set(value) != {"type", "function"} or set(function) != {"name"} or not isinstance(function["name"], str):
                raise refuse([], f"a named tool_choice is {{\"type\": \"function\", \"function\": {{\"name\": NAME}}}}, not {shown(value)}")
            return value
        raise refuse([], f"tool_choice must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": NAME}}}}, not {what(value)}")

    @model_validator(mode="after")
    def _tools_are_distinct(self):
        names = [t.function.name for t in self.tools or ()]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise refuse(["tools", i, "function", "name"], f"two tools are named {shown(name)}; a call could not say which one it means")
        if self.tool_choice not in (None, "none", "auto") and not names:
            raise refuse(["tool_choice"], f"tool_choice {shown(self.tool_choice)} needs tools to call; send tools, or remove tool_choice")
        if isinstance(self.tool_choice, dict) and self.tool_choice["function"]["name"] not in names:
            name = self.tool_choice["function"]["name"]
            raise refuse(["tool_choice", "function", "name"], f"tool_choice names {shown(name)}, which is not among the tools ({', '.join(names)})")
        return self


TOOL_MESSAGE_FIELDS = ("tool_calls", "tool_call_id")
REASONING_MESSAGE_FIELDS = ("reasoning_content", "reasoning")


@functools.cache
def chat_request_class(tools: bool, reasoning: bool) -> type[ChatRequest]:
    """The /v1/chat/completions body for a server that parses tool calls and/or reasoning."""
    if not tools and not reasoning:
        return ChatRequest
    taken = (TOOL_MESSAGE_FIELDS if tools else ()) + (REASONING_MESSAGE_FIELDS if reasoning else ())

    class Message(AgentChatMessage):
        not_supported = {k: v for k, v in ChatMessage.not_supported.items() if k not in taken}
        roles: ClassVar[tuple[str, ...]] = ROLES + (("tool",) if tools else ())

    class Request(AgentChatRequest):
        not_supported = {k: v for k, v in ChatRequest.not_supported.items() if not (tools and k in ("tools", "tool_choice"))}

        messages: list[Message] = Field(min_length=1)

    Message.__name__ = Message.__qualname__ = "ChatMessage"
    Request.__name__ = Request.__qualname__ = "ChatRequest"
    return Request

"""The constraint that enforces tool_choice "required", a named function, or `strict: true` tools, in
Qwen3.5's XML tool-call format (`<tool_call>\\n<function=NAME>\\n<parameter=P>\\nVALUE\\n</parameter>\\n...`).

It is xgrammar's structural tag for Qwen3.5 (model "qwen_3_5"): each call's parameters follow the tool's
JSON schema, values written as the XML format writes them. xgrammar lets any whitespace surround a value
that is not a free string (an enum, a number, a length-bounded string), where the format (and the parser,
hylo.parsers.tool_calls) has exactly one newline on each side: " UTC \\n" would pass the grammar and fail
the enum. hylo pins those to the newlines (`_value_newlines`). Thinking comes first, unconstrained: when the
prompt leaves a thinking block open, the model may think freely until `</think>\\n\\n`, and the tool-call
constraint applies from there (constraining the thinking would change what the model reasons about; a
request cut by max_tokens while thinking ends with finish_reason "length", as any other).
- "required": one call or more, the first right after the thinking; text may follow a call (as OpenAI and
  vLLM allow); with parallel_tool_calls false, exactly one call and nothing after it.
- a named function: exactly that one call, nothing after it.
- "auto" with `strict: true` tools: free text, and any call of a strict tool follows its schema; the other
  tools' arguments are left free (what `strict` asks for, and no more).
"""

from __future__ import annotations

import re

from hylo.errors import InvalidParam
from hylo.structured.compiler import MAX_WHITESPACE_RUN, xgrammar_message
from hylo.structured.params import MAX_SPEC_CHARS, StructuredOutputsParams, check_depth


def tool_call_constraint(
    tools: list[dict], tool_choice: str | dict, thinking: bool, parallel_tool_calls: bool = True,
) -> StructuredOutputsParams | None:
    """The constraint for this choice of tools, or None when nothing is enforced ("none", or "auto" without
    strict tools). `tools` are OpenAI's tool definitions; `thinking`: the prompt left a thinking block open."""
    import xgrammar as xgr

    strict = [t for t in tools if t["function"].get("strict") is True]
    if tool_choice == "none" or (tool_choice == "auto" and not strict):
        return None
    for i, tool in enumerate(tools):  # compiling grows with the cube of a schema's depth, as for response_format
        check_depth(tool["function"].get("parameters"), f"tools[{i}].function.parameters")
    if tool_choice == "auto":  # only the strict tools' arguments are held to their schemas
        tools = [t if t in strict else {**t, "function": {**t["function"], "strict": False}} for t in tools]
    try:
        tag = xgr.get_model_structural_tag(
            "qwen_3_5", tools=tools, tool_choice=tool_choice, reasoning="enabled" if thinking else "disabled",
            parallel_tool_calls=parallel_tool_calls, max_whitespace_cnt=MAX_WHITESPACE_RUN,
        )
        grammar = str(xgr.Grammar.from_structural_tag(tag.model_dump_json()))
    except Exception as e:  # a parameter schema xgrammar cannot take
        raise InvalidParam("tools", f"the tools cannot be turned into a tool-call grammar: {xgrammar_message(e)}") from None
    grammar = _value_newlines(grammar)
    if len(grammar) > MAX_SPEC_CHARS:  # made from the tools: they are what the request must cut
        raise InvalidParam("tools", f"the tools make a tool-call grammar of {len(grammar)} characters; hylo compiles constraints of up to "
                                    f"{MAX_SPEC_CHARS}: send fewer tools, or smaller parameter schemas")
    return StructuredOutputsParams(grammar=grammar)


# In xgrammar's EBNF for the qwen_xml style: `">" whitespace_12{0, 16} VALUE whitespace_13{0, 16} "</parameter>"`.
_BEFORE_VALUE = re.compile(r'">" whitespace[_\d]*\{0, \d+\}')  # whitespace_12, or whitespace_12_1 for a second tool
_AFTER_VALUE = re.compile(r'whitespace[_\d]*\{0, \d+\} "</parameter>"')


def _value_newlines(grammar: str) -> str:
    return _AFTER_VALUE.sub(r'"\\n" "</parameter>"', _BEFORE_VALUE.sub(r'">" "\\n"', grammar))


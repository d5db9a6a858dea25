"""Reasoning and tool calls together (ChatOutputParser): streamed deltas add up to the whole message at every split."""

import itertools

import pytest

from hylo.parsers import output_parser
from tests.parsers.test_tool_calls import TOOLS, call

PROMPT = "<|im_start|>user\nweather?<|im_end|>\n<|im_start|>assistant\n<think>\n"
OUTPUT = "Two cities <b>.\n</think>\n\nChecking both.\n\n" + call("get_weather", city="Paris", days="2") + "\n" + call("get_weather", city="Rome")


def parser():
    ids = (f"call_{i}" for i in itertools.count())
    p = output_parser("qwen3", PROMPT, None, "qwen3_coder", TOOLS)
    p.tool_parser.new_id = lambda: next(ids)
    return p


def accumulate(deltas: list[dict]) -> dict:
    """What an OpenAI client builds from the deltas."""
    message = {"content": "", "reasoning_content": "", "reasoning": "", "tool_calls": []}
    for d in deltas:
        for key in ("content", "reasoning_content", "reasoning"):
            message[key] += d.get(key, "")
        for piece in d.get("tool_calls", []):
            if piece["index"] == len(message["tool_calls"]):
                assert {"id", "type"} <= set(piece) and piece["function"]["name"], "a call starts with its id, type and name"
                message["tool_calls"].append({"id": piece["id"], "type": piece["type"], "function": {"name": piece["function"]["name"], "arguments": ""}})
            message["tool_calls"][piece["index"]]["function"]["arguments"] += piece["function"]["arguments"]
    return message


def test_whole_message():
    p = parser()
    p.feed(OUTPUT, final=True)
    assert p.message() == {
        "content": "Checking both.", "reasoning_content": "Two cities <b>.", "reasoning": "Two cities <b>.",
        "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}},
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
        ],
    }


@pytest.mark.parametrize("k", range(len(OUTPUT) + 1))
def test_deltas_add_up_at_every_split(k):
    whole = parser()
    whole.feed(OUTPUT, final=True)
    p = parser()
    deltas = [p.feed(OUTPUT[:k]).openai(), p.feed(OUTPUT[k:], final=True).openai()]
    assert accumulate(deltas) == whole.message()
    assert p.message() == whole.message() and p.called


def test_character_by_character():
    whole = parser()
    whole.feed(OUTPUT, final=True)
    p = parser()
    deltas = [p.feed(ch).openai() for ch in OUTPUT] + [p.finish().openai()]
    assert accumulate(deltas) == whole.message()
    seen = [key for d in deltas for key in ("reasoning", "content", "tool_calls") if key in d]
    assert seen.index("content") > max(i for i, key in enumerate(seen) if key == "reasoning"), "reasoning, then the answer"


def test_no_reasoning_parser_and_no_tools_is_plain_content():
    p = output_parser(None, PROMPT, None, "qwen3_coder", None)  # no tools in the request: nothing parsed
    p.feed(OUTPUT, final=True)
    assert p.message() == {"content": OUTPUT}

"""The grammar that enforces tool_choice "required", a named function and strict tools in Qwen3.5's XML format."""

import json

import pytest

from hylo.parsers import output_parser
from hylo.sampling import InvalidParam
from hylo.structured import GrammarCompiler
from hylo.structured.tool_calls import tool_call_constraint
from tests.conftest import TEXT, build_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "zone": {"enum": ["UTC", "CET"]}, "days": {"type": "integer"}},
    "required": ["city", "zone"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=zone>\nCET\n</parameter>\n</function>\n</tool_call>"


@pytest.fixture(scope="module")
def compiler():
    c = GrammarCompiler(build_tokenizer(), TEXT["vocab_size"], [0])
    yield c
    c.close()


def accepts(compiler, text: str, tools, choice, thinking=False, parallel=True) -> bool:
    constraint = tool_call_constraint(tools, choice, thinking, parallel)
    matcher = compiler.matcher(compiler.compile(constraint.spec()).result())
    return matcher.accept_string(text) and matcher.accept_token(0) and matcher.is_terminated()


def test_nothing_to_enforce_gives_no_constraint():
    assert tool_call_constraint([WEATHER], "auto", thinking=False) is None
    assert tool_call_constraint([WEATHER], "none", thinking=False) is None


def test_required_needs_a_call_that_follows_the_schema(compiler):
    assert accepts(compiler, CALL, [WEATHER, CLOCK], "required")
    assert not accepts(compiler, "I will not call anything.", [WEATHER, CLOCK], "required")
    assert not accepts(compiler, CALL.replace("CET", "PST"), [WEATHER, CLOCK], "required")  # not in the enum
    assert not accepts(compiler, CALL.replace("\nCET\n", "  CET \n"), [WEATHER, CLOCK], "required")  # the format's newlines, pinned
    assert not accepts(compiler, CALL.replace("<parameter=zone>\nCET\n</parameter>\n", ""), [WEATHER], "required")  # zone is required
    assert accepts(compiler, CALL + "\n" + CALL, [WEATHER], "required")
    assert not accepts(compiler, CALL + "\n" + CALL, [WEATHER], "required", parallel=False)


def test_a_named_function_is_the_only_call(compiler):
    named = {"type": "function", "function": {"name": "get_time"}}
    assert accepts(compiler, "<tool_call>\n<function=get_time>\n\n</function>\n</tool_call>", [WEATHER, CLOCK], named)
    assert not accepts(compiler, CALL, [WEATHER, CLOCK], named)


def test_with_thinking_the_call_comes_after_it(compiler):
    assert accepts(compiler, "Paris, I think.\n</think>\n\n" + CALL, [WEATHER], "required", thinking=True)
    assert not accepts(compiler, CALL, [WEATHER], "required", thinking=True)


def test_strict_tools_under_auto(compiler):
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    assert accepts(compiler, "No call needed.", [strict, CLOCK], "auto")
    assert accepts(compiler, "Let me look. " + CALL, [strict, CLOCK], "auto")
    assert not accepts(compiler, "Let me look. " + CALL.replace("CET", "PST"), [strict, CLOCK], "auto")


def test_what_the_grammar_allows_the_parser_reads_back():
    parser = output_parser(None, "", None, "qwen3_coder", [WEATHER])
    parser.feed(CALL, final=True)
    assert json.loads(parser.message()["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris", "zone": "CET"}


def test_a_schema_xgrammar_refuses_names_the_tools():
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "wat"}}}}}
    with pytest.raises(InvalidParam) as e:
        tool_call_constraint([bad], "required", thinking=False)
    assert e.value.param == "tools"


def test_tools_whose_grammar_is_too_large_are_refused_naming_the_tools():
    """The grammar is made from the tools, not sent: its size is the tools' doing, and the message says so."""
    tools = [{"type": "function", "function": {"name": f"f{i}", "strict": True, "parameters": {
        "type": "object", "properties": {f"p{j}": {"type": "string", "pattern": f"x{i}y{j}[a-z]{{{j}}}"} for j in range(20)}}}} for i in range(60)]
    with pytest.raises(InvalidParam) as e:
        tool_call_constraint(tools, "required", thinking=False)
    assert e.value.param == "tools" and "structured_outputs" not in str(e.value) and "fewer" in str(e.value)


def test_a_tool_schema_nested_too_deeply_is_refused_naming_it():
    parameters = {"type": "object"}
    for _ in range(70):
        parameters = {"type": "object", "properties": {"a": parameters}}
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    with pytest.raises(InvalidParam) as e:
        tool_call_constraint([WEATHER, tool], "required", thinking=False)
    assert e.value.param == "tools[1].function.parameters" and "nests deeper" in str(e.value)

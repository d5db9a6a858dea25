"""--tool-call-parser qwen3_coder on fixed outputs: calls, typed arguments, content, and the same result
however the output is chunked (each streamed call announced before its arguments, pieces adding up)."""

import itertools
import json

import pytest

from hylo.parsers import Qwen3CoderToolParser
from hylo.parsers.tool_calls import convert, schema_types

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "scale": {"type": "number"},
                "metric": {"type": "boolean"},
                "options": {"type": "object"},
                "hours": {"type": "array", "items": {"type": "integer"}},
                "zip": {"type": "string"},
                "note": {"type": ["string", "null"]},
                "unit": {"enum": ["C", "F"]},
                "count": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            },
        },
    },
}
TOOLS = [WEATHER, {"type": "function", "function": {"name": "write_file", "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}}}}}]


def call(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def run(chunks: list[str], tools=TOOLS, max_calls=None):
    """(content, [(name, arguments)]) from the events, checking the stream's shape on the way."""
    ids = (f"call_{i}" for i in itertools.count())
    parser = Qwen3CoderToolParser(tools, max_calls, new_id=lambda: next(ids))
    content, calls = [], []
    for event in [e for c in chunks for e in parser.feed(c)] + parser.finish():
        if event[0] == "content":
            assert event[1], "no empty content pieces"
            content.append(event[1])
        elif event[0] == "call":
            assert event[1] == len(calls) and event[2] == f"call_{event[1]}", "calls announced in order, with their id"
            calls.append([event[3], ""])
        else:
            assert event[1] == len(calls) - 1, "arguments belong to the call announced last"
            calls[event[1]][1] += event[2]
    return "".join(content), [tuple(c) for c in calls]


# (model output, content, [(name, arguments as a dict)])
CASES = [
    pytest.param(
        "Let me check.\n\n" + call("get_weather", city="Paris", days="3"),
        "Let me check.", [("get_weather", {"city": "Paris", "days": 3})], id="content-then-call"),
    pytest.param(
        call("get_weather", city="Paris", days="3", scale="1.5", metric="true", options='{"lang": "fr", "n": [1, 2]}',
             hours="[9, 12]", zip="07001", note="null", unit="C", count="None"),
        "", [("get_weather", {"city": "Paris", "days": 3, "scale": 1.5, "metric": True, "options": {"lang": "fr", "n": [1, 2]},
                              "hours": [9, 12], "zip": "07001", "note": None, "unit": "C", "count": None})], id="typed-by-schema"),
    pytest.param(
        call("get_weather", days="three", metric="yes", options="{'lang': 'fr'}", hours="not a list"),
        "", [("get_weather", {"days": "three", "metric": "yes", "options": {"lang": "fr"}, "hours": "not a list"})], id="values-that-do-not-fit"),
    pytest.param(
        call("get_weather", city="Paris") + "\n" + call("get_weather", city="Rome") + "\n",
        "", [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})], id="two-calls"),
    pytest.param(
        call("write_file", path="a.xml", content="<a>\n</parameter> is literal here\n<b/></a>\n"),
        "", [("write_file", {"path": "a.xml", "content": "<a>\n</parameter> is literal here\n<b/></a>\n"})], id="xml-in-a-value"),
    pytest.param(
        call("write_file", path="t.txt", content="line\n\n"),
        "", [("write_file", {"path": "t.txt", "content": "line\n\n"})], id="newlines-kept-but-the-format's"),
    pytest.param(
        call("unknown_tool", x="1", y='{"a": 1}'),
        "", [("unknown_tool", {"x": "1", "y": '{"a": 1}'})], id="no-schema-means-strings"),
    pytest.param(
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>",
        "", [("get_weather", {"city": "Paris"})], id="forgotten-parameter-end"),
    pytest.param(
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
        "", [("get_weather", {"city": "Paris", "days": 2})], id="forgotten-end-before-next-parameter"),
    pytest.param(
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
        "", [("get_weather", {"city": "Par"})], id="cut-by-max-tokens"),
    pytest.param(
        "<tool_call>\n<function=get_weather>\n<parameter=days>\n1",
        "", [("get_weather", {"days": 1})], id="cut-in-a-typed-value"),
    pytest.param(
        "I would write <tool_call>\n<function={{ name }}>\n</function>\n</tool_call> here.",
        "I would write <tool_call>\n<function={{ name }}>\n</function>\n</tool_call> here.", [], id="not-a-function-name"),
    pytest.param("Use <tool_call> tags, <b>bold</b>, x < y.", "Use <tool_call> tags, <b>bold</b>, x < y.", [], id="tags-in-content"),
    pytest.param("ends with <tool_ca", "ends with <tool_ca", [], id="partial-tag-at-end"),
    pytest.param("trailing space  \n", "trailing space  \n", [], id="trailing-whitespace-kept"),
    pytest.param(
        call("get_weather", city="Paris") + "\n\nDone, I called it.",
        "Done, I called it.", [("get_weather", {"city": "Paris"})], id="content-after"),
    pytest.param(
        call("get_weather", city="Zürich ✓ 日本", unit="F"),
        "", [("get_weather", {"city": "Zürich ✓ 日本", "unit": "F"})], id="unicode"),
    pytest.param(
        "<tool_call>\n<function=get_weather>\n</function>\n</tool_call>",
        "", [("get_weather", {})], id="no-parameters"),
    pytest.param(
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</tool_call>",
        "", [("get_weather", {"city": "Paris"})], id="forgotten-function-end"),
]


@pytest.mark.parametrize("output, content, calls", CASES)
def test_whole_output(output, content, calls):
    got_content, got_calls = run([output])
    assert got_content == content
    assert [(name, json.loads(arguments)) for name, arguments in got_calls] == calls


@pytest.mark.parametrize("output, content, calls", CASES)
def test_every_split_and_every_character(output, content, calls):
    whole = run([output])
    for chunks in [[output[:k], output[k:]] for k in range(len(output) + 1)] + [list(output)]:
        assert run(chunks) == whole, chunks


# The main case, split at each point as its own test.
MAIN = "Checking.\n\n" + call("get_weather", city="Paris", days="3", options='{"a": [1]}') + "\n" + call("write_file", path="x", content="</parameter>\n")


@pytest.mark.parametrize("k", range(len(MAIN) + 1))
def test_split_point(k):
    content, calls = run([MAIN[:k], MAIN[k:]])
    assert content == "Checking."
    assert calls == [("get_weather", '{"city": "Paris", "days": 3, "options": {"a": [1]}}'), ("write_file", '{"path": "x", "content": "</parameter>\\n"}')]
    assert calls[0][1] == json.dumps({"city": "Paris", "days": 3, "options": {"a": [1]}}), "arguments as json.dumps writes them"


def test_a_string_argument_streams_as_it_comes_and_a_typed_one_when_complete():
    parser = Qwen3CoderToolParser(TOOLS, new_id=lambda: "call_0")
    assert parser.feed("<tool_call>\n<function=write_file>\n") == [("call", 0, "call_0", "write_file"), ("arguments", 0, "{")]
    assert parser.feed("<parameter=content>\nline 1\nli") == [("arguments", 0, '"content": "'), ("arguments", 0, "line 1\\nli")]
    assert parser.feed("ne 2\n") == [("arguments", 0, "ne 2")]  # the newline may be the format's: held
    assert parser.feed("</parameter>\n") == []  # '</parameter>' must be followed by a tag to close the value
    assert parser.feed("<parameter=path>") == [("arguments", 0, '"')]
    parser = Qwen3CoderToolParser(TOOLS, new_id=lambda: "call_0")
    assert parser.feed("<tool_call>\n<function=get_weather>\n<parameter=days>\n1")[-1] == ("arguments", 0, '"days": ')
    assert parser.feed("2") == []  # "1" is not yet the integer
    assert parser.feed("\n</parameter>\n</function>") == [("arguments", 0, "12"), ("arguments", 0, "}")]


def test_parallel_tool_calls_false_keeps_the_first_call():
    output = call("get_weather", city="Paris") + "\n" + call("get_weather", city="Rome") + " and text"
    content, calls = run([output], max_calls=1)
    assert content == "" and calls == [("get_weather", '{"city": "Paris"}')]


@pytest.mark.parametrize(
    "schema, types",
    [
        ({"type": "integer"}, ["integer"]),
        ({"type": ["string", "null"]}, ["string", "null"]),
        ({"anyOf": [{"type": "number"}, {"type": "null"}]}, ["number", "null"]),
        ({"enum": [1, 2]}, ["integer"]),
        ({"const": True}, ["boolean"]),
        ({"properties": {}}, ["object"]),
        ({"items": {}}, ["array"]),
        ({"type": "int"}, ["integer"]),
        ({"description": "anything"}, []),
        (None, []),
    ],
)
def test_schema_types(schema, types):
    assert schema_types(schema) == types


@pytest.mark.parametrize(
    "text, types, value",
    [
        ("42", ["integer"], 42), ("4.0", ["integer"], 4), ("4.5", ["integer"], "4.5"), ("-3", ["number"], -3), ("1e3", ["number"], 1000.0),
        ("nan", ["number"], "nan"), ("TRUE", ["boolean"], True), ("null", ["integer"], None), ("null", ["string"], "null"),
        ("None", ["string", "null"], None), ('"{\\"a\\": 1}"', ["object"], {"a": 1}), ("[1, 'x']", ["array"], [1, "x"]),
        ("{}", ["array"], "{}"), ("7", ["integer", "string"], 7), ("seven", ["integer", "string"], "seven"), (" spaced ", [], " spaced "),
    ],
)
def test_convert(text, types, value):
    assert convert(text, types) == value and type(convert(text, types)) is type(value)

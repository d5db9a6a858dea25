"""Structured outputs, enforced tool_choice and sampling controls through the real `openai` client against
`hylo serve` (the demo checkpoint with a Qwen3.5-format chat template and its two adapters): outputs parse
and validate, in mixed batches; every bad value is a 400 naming its field, and the server goes on."""

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from hylo.demo import ADAPTER_DIRS
from tests.qwen3_5_template import qwen3_5_demo
from tests.server.conftest import KEY, Server

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                   "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2}, "vip": {"type": "boolean"}},
    "required": ["name", "age", "pets", "vip"],
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
MESSAGES = [{"role": "user", "content": "count: 3 4 5"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = qwen3_5_demo(tmp_path_factory.mktemp("structured"))
    s = Server(model, "--api-key", KEY, "--served-model-name", "q", "--max-model-len", "4096", "--reasoning-parser", "qwen3",
               "--enable-auto-tool-choice", "--tool-call-parser", "qwen3_coder", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
               "--lora-modules", f"down={ADAPTER_DIRS['down']}", f"twos={ADAPTER_DIRS['twos']}")
    yield s
    assert s.stop()


def post(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def test_response_format_json_schema_and_json_object(server):
    client = server.client()
    for model in ("q", "down"):
        out = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=400, temperature=0, extra_body=NO_THINKING,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)
    out = client.completions.create(model="twos", prompt="count: 7 8", max_tokens=300, temperature=0.7, seed=4,
                                    extra_body={"response_format": {"type": "json_object"}})
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].text), dict)
    assert out.choices[0].text.startswith("{")


def test_the_constraint_holds_after_the_thinking(server):
    """--reasoning-parser: the model thinks freely (the counting demo model never stops), the constraint waits."""
    out = server.client().chat.completions.create(model="q", messages=MESSAGES, max_tokens=6, temperature=0,
                                                  extra_body={"guided_choice": ["yes", "no"]})
    assert out.choices[0].finish_reason == "length" and out.choices[0].message.reasoning_content and out.choices[0].message.content is None
    out = server.client().chat.completions.create(model="q", messages=MESSAGES, max_tokens=6, temperature=0,
                                                  extra_body={"guided_choice": ["yes", "no"], **NO_THINKING})
    assert out.choices[0].message.content in ("yes", "no")


def test_every_vllm_field_in_one_mixed_batch(server):
    """Concurrent requests (constrained and free, base and adapters) share the batch; each keeps its constraint."""
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9]'
    cases = [
        ("q", {"guided_json": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON)),
        ("down", {"guided_regex": r"[a-d]{3}-\d{2}"}, lambda t: re.fullmatch(r"[a-d]{3}-\d{2}", t) or pytest.fail(t)),
        ("twos", {"guided_choice": ["alpha", "beta", "gamma"]}, lambda t: t in ("alpha", "beta", "gamma") or pytest.fail(t)),
        ("q", {"guided_grammar": grammar}, lambda t: re.fullmatch(r"\([1-9](\+[1-9])*\)", t) or pytest.fail(t)),
        ("down", {"structured_outputs": {"json": PERSON, "disable_any_whitespace": True}},
         lambda t: (jsonschema.validate(json.loads(t), PERSON), "\n" not in t)[1] or pytest.fail(t)),
        ("twos", {"structured_outputs": {"regex": "[xyz]{4}"}}, lambda t: re.fullmatch("[xyz]{4}", t) or pytest.fail(t)),
        ("q", {"structured_outputs": {"choice": ["on", "off"]}}, lambda t: t in ("on", "off") or pytest.fail(t)),
        ("down", {}, None),
        ("q", {}, None),
    ]
    client = server.client()

    def run(case, stream: bool):
        model, extra, check = case
        json_out = "guided_json" in extra or "json" in extra.get("structured_outputs", {})
        kwargs = dict(model=model, prompt="count: 1 2", max_tokens=400 if json_out else 40, temperature=0.9, seed=11, extra_body=extra)
        if stream:
            text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)
        else:
            text = client.completions.create(**kwargs).choices[0].text
        if check is not None:
            check(text)
        return text

    with ThreadPoolExecutor(len(cases) * 2) as pool:
        whole = list(pool.map(lambda c: run(c, False), cases))
        streamed = list(pool.map(lambda c: run(c, True), cases))
    assert whole == streamed  # seeded: the same text streamed or not, whatever shares the batch


def test_tool_choice_required_and_named_are_enforced(server):
    client = server.client()
    tools = [WEATHER, CLOCK]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for choice, expected in (("required", None), ({"type": "function", "function": {"name": "get_time"}}, "get_time")):
        for seed in (1, 2):
            out = client.chat.completions.create(model="q", messages=MESSAGES, tools=tools, tool_choice=choice, parallel_tool_calls=False,
                                                 max_tokens=200, temperature=1.0, seed=seed, extra_body=NO_THINKING)
            choice_out = out.choices[0]
            assert choice_out.finish_reason == "tool_calls", choice_out
            (call,) = choice_out.message.tool_calls
            assert expected is None or call.function.name == expected
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    # Streamed: the pieces add up to one valid call of the named function.
    chunks = list(client.chat.completions.create(model="down", messages=MESSAGES, tools=tools, stream=True, max_tokens=200, temperature=0,
                                                 tool_choice={"type": "function", "function": {"name": "get_weather"}}, extra_body=NO_THINKING))
    pieces = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].function.name == "get_weather" and {p.index for p in pieces} == {0}
    jsonschema.validate(json.loads("".join(p.function.arguments or "" for p in pieces)), schemas["get_weather"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_strict_tools_with_auto(server):
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    out = server.client().chat.completions.create(model="q", messages=MESSAGES, tools=[strict, CLOCK], max_tokens=60, temperature=0,
                                                  extra_body=NO_THINKING)
    for call in out.choices[0].message.tool_calls or []:
        if call.function.name == "get_weather":
            jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_sampling_controls(server):
    client = server.client()
    free = client.completions.create(model="q", prompt="count: 1 2", max_tokens=8, temperature=0, logprobs=0, extra_body={"ignore_eos": True})
    tokenizer_ids = post(server, "/tokenize", {"prompt": free.choices[0].text, "add_special_tokens": False}).json()["tokens"]
    first = tokenizer_ids[0]
    moved = client.completions.create(model="q", prompt="count: 1 2", max_tokens=1, temperature=0, logit_bias={str(first): -100})
    assert moved.choices[0].text != free.choices[0].logprobs.tokens[0]
    forced = client.completions.create(model="q", prompt="count: 1 2", max_tokens=6, temperature=0, logit_bias={"40": 100},
                                       extra_body={"ignore_eos": True})
    ids = post(server, "/tokenize", {"prompt": forced.choices[0].text, "add_special_tokens": False}).json()["tokens"]
    assert set(ids) == {40}
    allowed = [40, 41, 42]
    out = client.chat.completions.create(model="twos", messages=MESSAGES, max_tokens=10, temperature=1.2, seed=3,
                                         extra_body={"allowed_token_ids": allowed, "ignore_eos": True, **NO_THINKING})
    assert set(post(server, "/tokenize", {"prompt": out.choices[0].message.content, "add_special_tokens": False}).json()["tokens"]) <= set(allowed)
    word = free.choices[0].text.split()[0]
    banned = client.completions.create(model="q", prompt="count: 1 2", max_tokens=8, temperature=0, extra_body={"ignore_eos": True, "bad_words": [word]})
    assert word not in banned.choices[0].text.split()


BIG_SCHEMA = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(10_000)}, "required": ["p0"]}
HOSTILE = [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
     "response_format.json_schema.schema", ("JSON schema", "wat")),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema", ("an object",)),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "name": 5}}}, "response_format.json_schema.name", ("string",)),
    ("/v1/chat/completions", {"response_format": "json"}, "response_format", ("an object",)),
    ("/v1/chat/completions", {"response_format": {"type": "yaml"}}, "response_format.type", ("json_schema",)),
    ("/v1/completions", {"guided_regex": "(a"}, "guided_regex", ("regex",)),
    ("/v1/completions", {"guided_regex": 5}, "guided_regex", ("a string",)),
    ("/v1/completions", {"guided_regex": "(a+)+$" * 3}, None, ()),  # no catastrophic backtracking: a grammar, not a backtracker
    ("/v1/completions", {"guided_grammar": "root ::= nothing"}, "guided_grammar", ("EBNF", "nothing")),
    ("/v1/completions", {"guided_choice": []}, "guided_choice", ("non-empty",)),
    ("/v1/completions", {"guided_choice": [f"option {i} " * 8 for i in range(20_000)]}, "guided_choice", ("characters long",)),
    ("/v1/completions", {"guided_json": {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 9} for i in range(20_000)}}},
     "guided_json", ("characters long",)),
    ("/v1/completions", {"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs", ("exactly one",)),
    ("/v1/completions", {"structured_outputs": {"backend": "outlines"}}, "structured_outputs.backend", ("unknown field",)),
    ("/v1/completions", {"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex", ("both constrain",)),
    ("/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias", ("token ids",)),
    ("/v1/completions", {"logit_bias": {"-3": 1}}, "logit_bias", ("token ids",)),
    ("/v1/completions", {"logit_bias": {"99999999": 1}}, "logit_bias", ("[0, 320)",)),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias", ("[-100, 100]",)),
    ("/v1/completions", {"logit_bias": {"5": "high"}}, "logit_bias", ("[-100, 100]",)),
    ("/v1/completions", {"logit_bias": [5]}, "logit_bias", ("an object",)),
    ("/v1/completions", {"allowed_token_ids": []}, "allowed_token_ids", ("non-empty",)),
    ("/v1/completions", {"allowed_token_ids": [1, 100000]}, "allowed_token_ids", ("[0, 320)",)),
    ("/v1/completions", {"allowed_token_ids": ["1"]}, "allowed_token_ids[0]", ("an integer",)),
    ("/v1/completions", {"bad_words": [""]}, "bad_words", ("empty",)),
    ("/v1/completions", {"bad_words": "word"}, "bad_words", ("a list",)),
]


@pytest.mark.parametrize("path, fields, param, words", HOSTILE)
def test_hostile_constraints_are_400s_naming_the_field(server, path, fields, param, words):
    base = {"model": "q", "max_tokens": 4, "temperature": 0}
    body = {**base, **({"messages": MESSAGES} if "chat" in path else {"prompt": "count: 1 2"}), **fields}
    r = post(server, path, body)
    if param is None:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param, error
        for word in words:
            assert word in error["message"], error["message"]
        assert "/project" not in error["message"] and ".cc:" not in error["message"]
    assert post(server, "/v1/completions", {**base, "prompt": "count: 1 2"}).status_code == 200


def test_a_schema_of_10k_properties_compiles_in_bounded_time_off_the_step_loop(server):
    client = server.client()
    with ThreadPoolExecutor(2) as pool:
        start = time.monotonic()
        big = pool.submit(lambda: post(server, "/v1/completions", {"model": "q", "prompt": "count: 1", "max_tokens": 30, "temperature": 0,
                                                                     "guided_json": BIG_SCHEMA}))
        free = client.completions.create(model="q", prompt="count: 1 2", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})  # not held up
        assert free.choices[0].text and not big.done()
        assert big.result().status_code == 200 and time.monotonic() - start < 120
    assert big.result().json()["choices"][0]["text"].startswith("{")


def test_many_tools_become_a_grammar_off_the_event_loop(server):
    """Turning 1,500 strict tools into their grammar takes seconds (then refused: too large): on a worker thread, so
    the server answers others meanwhile."""
    tools = [{"type": "function", "function": {"name": f"f{i}", "strict": True, "parameters": {"type": "object", "properties": {
        f"p{j}": {"type": "string", "pattern": f"x{i}y{j}[a-z]{{{j}}}"} for j in range(20)}}}} for i in range(1500)]
    body = {"model": "q", "messages": MESSAGES, "tools": tools, "tool_choice": "required", "max_tokens": 4, **NO_THINKING}
    latencies = []
    with ThreadPoolExecutor(1) as pool:
        big = pool.submit(post, server, "/v1/chat/completions", body)
        while not big.done():
            start = time.monotonic()
            assert httpx.get(server.url + "/health", timeout=60).status_code == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.05)
    assert big.result().status_code == 400 and big.result().json()["error"]["param"] == "tools"
    assert len(latencies) > 5 and max(latencies) < 1.0, latencies


def test_tool_choice_with_a_schema_xgrammar_refuses_is_a_400(server):
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "wat"}}}}}
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="q", messages=MESSAGES, tools=[bad], tool_choice="required", max_tokens=4, extra_body=NO_THINKING)
    assert e.value.body["param"] == "tools"

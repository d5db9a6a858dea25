"""Hostile but realistic requests (issue 12, items 4 and 5): whatever hylo does not implement is refused by name,
types are strict, bad text and paths are 400s, every error has OpenAI's shape and shows no server path. After
each case the server still serves: /health OK, a fixed greedy completion unchanged, nothing left in use."""

import json
import shutil

import httpx
import pytest

from hylo.demo import ADAPTER_DIRS, BASE_DIR, expected_continuation, prompt_for
from hylo.server.protocol import hide_paths
from tests.server.conftest import KEY, assert_still_serving

AUTH = {"Authorization": f"Bearer {KEY}"}
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
C = {"model": "base", "prompt": "count: 1 2", "max_tokens": 4}
M = {"model": "base", "messages": [{"role": "user", "content": "count: 1 2"}], "max_tokens": 4}


def post(server, path: str, body=None, content: bytes | None = None, headers: dict | None = None) -> httpx.Response:
    if content is None:
        content = json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as the escape "\ud800"
    headers = {**AUTH, "Content-Type": "application/json", **(headers or {})}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=60)


def assert_openai_error(r: httpx.Response, status: int, param: str | None, *words: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == status and isinstance(error["type"], str) and error["type"]
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error["message"]
    return error


def with_message(**fields) -> dict:
    return {**M, "messages": [{"role": "user", **fields}]}


def with_part(part) -> dict:
    return with_message(content=[{"type": "text", "text": "count: 1 2"}, part])


NOT_SUPPORTED = "not supported by hylo"

# Item 4, silent ignores: each field that hylo does not implement is refused by name.
SILENT_IGNORES = [
    pytest.param(CHAT, {**M, "echo": True}, "echo", id="chat-echo"),  # completions' echo is implemented; chat's means another thing
    pytest.param(COMPLETIONS, {**C, "suffix": " end"}, "suffix", id="suffix"),
    pytest.param(COMPLETIONS, {**C, "best_of": 3}, "best_of", id="best_of"),
    pytest.param(CHAT, {**M, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools", id="tools"),
    pytest.param(CHAT, {**M, "tool_choice": "required"}, "tool_choice", id="tool_choice"),
    pytest.param(CHAT, {**M, "functions": [{"name": "f", "parameters": {}}]}, "functions", id="functions"),
    pytest.param(CHAT, {**M, "function_call": "auto"}, "function_call", id="function_call"),
    pytest.param(CHAT, with_part({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}), "messages[0].content[1].type", id="image_url-part"),
    pytest.param(CHAT, with_part({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}), "messages[0].content[1].type", id="input_audio-part"),
    pytest.param(CHAT, {**M, "modalities": ["text", "audio"]}, "modalities", id="modalities"),
    pytest.param(CHAT, {**M, "audio": {"voice": "alloy", "format": "wav"}}, "audio", id="audio"),
    pytest.param(CHAT, {**M, "guided_whitespace_pattern": " "}, "guided_whitespace_pattern", id="guided_whitespace_pattern"),
    pytest.param(CHAT, {**M, "reasoning_effort": "high"}, "reasoning_effort", id="reasoning_effort"),
    pytest.param(CHAT, with_message(content="count: 1 2", name="bob"), "messages[0].name", id="message-name"),
    pytest.param(CHAT, {**M, "messages": [{"role": "tool", "content": "42"}]}, "messages[0].role", id="tool-role"),
    pytest.param(UNLOAD, {"lora_name": "down", "lora_int_id": 2}, "lora_int_id", id="unload-lora_int_id"),
]


@pytest.mark.parametrize("path, body, param", SILENT_IGNORES)
def test_what_hylo_does_not_implement_is_refused_by_name(server, path, body, param):
    named = param.rsplit(".", 1)[-1]
    if named == "type":  # a content part: the message names its type
        named = body["messages"][0]["content"][1]["type"]
    elif named == "role":
        named = body["messages"][0]["role"]
    assert_openai_error(post(server, path, body), 400, param, named, NOT_SUPPORTED)
    assert_still_serving(server)


@pytest.mark.parametrize(
    "path, body, param, words",
    [
        pytest.param(CHAT, {**M, "top_logprobs": 3}, "top_logprobs", ("logprobs: true",), id="top_logprobs-without-logprobs"),
        pytest.param(CHAT, {**M, "logprobs": False, "top_logprobs": 3}, "top_logprobs", ("logprobs: true",), id="top_logprobs-with-logprobs-false"),
        pytest.param(CHAT, with_part({"type": "hologram", "hologram": {}}), "messages[0].content[1].type", ("unknown content part type",), id="unknown-part-type"),
        pytest.param(CHAT, with_part({"type": "text", "text": "x", "cache_control": {}}), "messages[0].content[1].cache_control", ("unknown field",), id="unknown-key-in-text-part"),
        pytest.param(COMPLETIONS, {**C, "frobnicate": 1}, "frobnicate", ("unknown field", "remove it"), id="unknown-field"),
        pytest.param(CHAT, {**M, "temprature": 0}, "temprature", ("unknown field",), id="misspelt-field"),
        pytest.param(CHAT, with_message(content="hi", mood="grumpy"), "messages[0].mood", ("unknown field",), id="unknown-message-field"),
        pytest.param(COMPLETIONS, {**C, "stream_options": {"include_usage": True}}, "stream_options", ("stream: true",), id="stream_options-without-stream"),
        pytest.param(COMPLETIONS, {**C, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}, "stream_options.continuous_usage_stats", (NOT_SUPPORTED,), id="continuous_usage_stats"),
        pytest.param(CHAT, {**M, "max_tokens": 3, "max_completion_tokens": 5}, "max_completion_tokens", ("disagree",), id="max_tokens-vs-max_completion_tokens"),
        pytest.param(CHAT, {**M, "chat_template": "{{ messages }}"}, "chat_template", ("--trust-request-chat-template",), id="request-chat_template"),
        pytest.param(CHAT, {**M, "messages": []}, "messages", ("at least 1",), id="no-messages"),
    ],
)
def test_inconsistent_or_unknown_fields_are_refused(server, path, body, param, words):
    assert_openai_error(post(server, path, body), 400, param, *words)
    assert_still_serving(server)


# Item 4, lenient conversions: JSON types are strict.
@pytest.mark.parametrize(
    "path, body, param, words",
    [
        pytest.param(COMPLETIONS, {**C, "max_tokens": "5"}, "max_tokens", ("an integer", '"5"'), id="max_tokens-string"),
        pytest.param(COMPLETIONS, {**C, "max_tokens": True}, "max_tokens", ("an integer", "true"), id="max_tokens-true"),
        pytest.param(COMPLETIONS, {**C, "max_tokens": 5.5}, "max_tokens", ("an integer",), id="max_tokens-float"),
        pytest.param(COMPLETIONS, {**C, "temperature": "0"}, "temperature", ("a number",), id="temperature-string"),
        pytest.param(CHAT, {**M, "temperature": False}, "temperature", ("a number",), id="temperature-false"),
        pytest.param(COMPLETIONS, {**C, "stream": "yes"}, "stream", ("true or false",), id="stream-yes"),
        pytest.param(CHAT, {**M, "stream": 1}, "stream", ("true or false",), id="stream-1"),
        pytest.param(COMPLETIONS, {**C, "n": "2"}, "n", ("an integer",), id="n-string"),
        pytest.param(COMPLETIONS, {**C, "logprobs": True}, "logprobs", ("an integer",), id="completion-logprobs-true"),
        pytest.param(CHAT, {**M, "logprobs": 1}, "logprobs", ("true or false",), id="chat-logprobs-1"),
        pytest.param(COMPLETIONS, {**C, "seed": "7"}, "seed", ("an integer",), id="seed-string"),
        pytest.param(COMPLETIONS, {**C, "stop": 7}, "stop", ("a string or a list of strings",), id="stop-int"),
        pytest.param(COMPLETIONS, {**C, "stop": ["x", None]}, "stop[1]", ("a string",), id="stop-list-null"),
        pytest.param(COMPLETIONS, {**C, "stop_token_ids": ["1"]}, "stop_token_ids[0]", ("an integer",), id="stop_token_ids-string"),
        pytest.param(COMPLETIONS, {**C, "prompt": [1, True, 3]}, "prompt[1]", ("token id",), id="prompt-bool-token"),
        pytest.param(COMPLETIONS, {**C, "prompt": [[1, 2], [3, "4"]]}, "prompt[1][1]", ("token id",), id="prompt-string-token"),
        pytest.param(COMPLETIONS, {**C, "prompt": {"text": "x"}}, "prompt", ("a list of token ids",), id="prompt-object"),
        pytest.param(COMPLETIONS, {**C, "model": 3}, "model", ("a string",), id="model-int"),
        pytest.param(CHAT, {**M, "messages": "hello"}, "messages", ("a list",), id="messages-string"),
        pytest.param(CHAT, {**M, "add_generation_prompt": "false"}, "add_generation_prompt", ("true or false",), id="add_generation_prompt-string"),
        pytest.param(COMPLETIONS, {**C, "ignore_eos": 0}, "ignore_eos", ("true or false",), id="ignore_eos-0"),
        pytest.param(COMPLETIONS, {**C, "user": 12}, "user", ("a string",), id="user-int"),
        pytest.param(LOAD, {"lora_name": "x", "lora_path": 5}, "lora_path", ("a string",), id="lora_path-int"),
    ],
)
def test_types_are_strict(server, path, body, param, words):
    assert_openai_error(post(server, path, body), 400, param, *words)
    assert_still_serving(server)


def test_non_finite_numbers_are_refused(server):
    # Python's json (and so the server) reads NaN and Infinity; they are not numbers a sampler can use.
    for raw, param in ((b'"temperature": NaN', "temperature"), (b'"top_p": Infinity', "top_p"), (b'"presence_penalty": -Infinity', "presence_penalty")):
        r = post(server, COMPLETIONS, content=b'{"model": "base", "prompt": "x", ' + raw + b"}")
        assert_openai_error(r, 400, param, "finite")
    assert_still_serving(server)


# Item 5: values that used to reach the engine and end in a plain-text 500.
@pytest.mark.parametrize(
    "path, body, param, words",
    [
        pytest.param(COMPLETIONS, {**C, "prompt": "\ud800"}, "prompt", ("not valid Unicode", "surrogate"), id="lone-surrogate-prompt"),
        pytest.param(COMPLETIONS, {**C, "prompt": ["fine", "count: \udfff 1"]}, "prompt[1]", ("surrogate",), id="lone-surrogate-in-prompt-list"),
        pytest.param(COMPLETIONS, {**C, "stop": ["\ud83d"]}, "stop[0]", ("surrogate",), id="lone-surrogate-stop"),
        pytest.param(CHAT, with_message(content="count \udc00"), "messages[0].content", ("surrogate",), id="lone-surrogate-chat"),
        pytest.param(CHAT, with_message(content=[{"type": "text", "text": "\ud800"}]), "messages[0].content[0].text", ("surrogate",), id="lone-surrogate-part"),
        pytest.param(CHAT, with_message(content=[{"type": "text", "text": 123}]), "messages[0].content[0].text", ("must be a string", "123"), id="text-part-123"),
        pytest.param(CHAT, with_message(content=[{"type": "text"}]), "messages[0].content[0].text", ("must be a string",), id="text-part-without-text"),
        pytest.param(CHAT, with_message(content=["count: 1 2"]), "messages[0].content[0]", ("must be an object",), id="bare-string-part"),
        pytest.param(LOAD, {"lora_name": "", "lora_path": "x"}, "lora_name", ("lora_name must be",), id="lora_name-empty"),
        pytest.param(LOAD, {"lora_name": 'a"b\nc', "lora_path": "x"}, "lora_name", ("lora_name must be",), id="lora_name-quote-newline"),
        pytest.param(LOAD, {"lora_name": "x", "lora_path": "a\x00b"}, "lora_path", ("NUL",), id="lora_path-nul"),
        pytest.param(LOAD, {"lora_name": "x", "lora_path": ""}, "lora_path", ("lora_path must be",), id="lora_path-empty"),
        pytest.param(LOAD, {"lora_name": "x", "lora_path": "\ud800"}, "lora_path", ("surrogate",), id="lora_path-surrogate"),
        pytest.param(UNLOAD, {"lora_name": ""}, "lora_name", (), id="unload-empty-name"),
    ],
)
def test_bad_text_is_a_400_naming_the_field(server, path, body, param, words):
    assert_openai_error(post(server, path, body), 400, param, *words)
    assert_still_serving(server)


# Validation errors raised by hylo.sampling / the engine (InvalidParam) keep their field.
@pytest.mark.parametrize(
    "body, param",
    [
        pytest.param({**C, "top_k": -5}, "top_k", id="top_k"),
        pytest.param({**C, "min_p": 2}, "min_p", id="min_p"),
        pytest.param({**C, "max_tokens": 4, "min_tokens": 9}, "min_tokens", id="min_tokens"),
        pytest.param({**C, "max_tokens": 0}, "max_tokens", id="max_tokens-0"),
        pytest.param({**C, "stop": [""]}, "stop", id="empty-stop"),
        pytest.param({**C, "prompt": [10**9]}, "prompt", id="token-outside-vocab"),
    ],
)
def test_range_errors_from_the_engine_name_the_field(server, body, param):
    error = assert_openai_error(post(server, COMPLETIONS, body), 400, param, param)
    assert not error["message"].startswith("SamplingParams.")
    assert_still_serving(server)


# Item 5: unknown routes, wrong methods and unparseable bodies answer in OpenAI's shape.
@pytest.mark.parametrize(
    "method, path, content, headers, status, words",
    [
        pytest.param("GET", "/v1/nowhere", None, {}, 404, ("no route GET /v1/nowhere", "POST /v1/completions"), id="unknown-route"),
        pytest.param("POST", "/v2/completions", b"{}", {}, 404, ("no route",), id="unknown-route-post"),
        pytest.param("GET", COMPLETIONS, None, {}, 405, ("GET /v1/completions", "POST"), id="wrong-method"),
        pytest.param("DELETE", "/v1/models", None, {}, 405, ("GET",), id="wrong-method-models"),
        pytest.param("POST", COMPLETIONS, b'{"model": "base",\n "prompt": ', {}, 400, ("not valid JSON", "line 2 column 12"), id="truncated-json"),
        pytest.param("POST", COMPLETIONS, b'{"model": "base", "prompt": "x",}', {}, 400, ("not valid JSON", "line 1 column 33"), id="trailing-comma"),
        pytest.param("POST", COMPLETIONS, b'{"model": "base", "prompt": "\xff\xfe"}', {}, 400, ("UTF-8",), id="invalid-utf8"),
        pytest.param("POST", COMPLETIONS, b"[1, 2]", {}, 400, ("a JSON object", "a list"), id="json-list"),
        pytest.param("POST", COMPLETIONS, b'"hello"', {}, 400, ("a JSON object",), id="json-string"),
        pytest.param("POST", COMPLETIONS, b"", {}, 400, ("empty",), id="empty-body"),
        pytest.param("POST", COMPLETIONS, b'{"model": "base", "prompt": "x"}', {"Content-Type": "text/plain"}, 400, ("Content-Type: application/json",), id="not-json-content-type"),
    ],
)
def test_routes_methods_and_bodies_answer_in_openai_shape(server, method, path, content, headers, status, words):
    r = httpx.request(method, server.url + path, content=content, headers={**AUTH, "Content-Type": "application/json", **headers}, timeout=30)
    assert "detail" not in r.json()
    assert_openai_error(r, status, None, *words)
    assert_still_serving(server)


def server_paths(lora_root) -> list[str]:
    return [str(lora_root), str(BASE_DIR), *map(str, ADAPTER_DIRS.values()), str(BASE_DIR.parent)]


# Item 5: errors and /v1/models show no server path.
def test_models_show_no_server_path(server, lora_root):
    shutil.copytree(ADAPTER_DIRS["twos"], lora_root / "team" / "mine", dirs_exist_ok=True)
    assert post(server, LOAD, {"lora_name": "hostile-mine", "lora_path": "team/mine"}).status_code == 200
    try:
        r = httpx.get(server.url + "/v1/models", headers=AUTH, timeout=10)
        roots = {m["id"]: m["root"] for m in r.json()["data"]}
        assert roots["base"] == "base"  # the served name, as in vLLM
        assert roots["down"] == "down" and roots["twos"] == "twos"  # adapters given at startup: their names
        assert roots["hostile-mine"] == "team/mine"  # loaded at runtime: the path the client gave
        assert not any(p in r.text for p in server_paths(lora_root))
    finally:
        assert post(server, UNLOAD, {"lora_name": "hostile-mine"}).status_code == 200
    assert_still_serving(server)


def test_adapter_errors_show_the_clients_path_not_the_servers(server, lora_root):
    (lora_root / "team" / "broken").mkdir(parents=True, exist_ok=True)
    shutil.copytree(ADAPTER_DIRS["down"], lora_root / "team" / "broken", dirs_exist_ok=True)
    (lora_root / "team" / "broken" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    r = post(server, LOAD, {"lora_name": "hostile-broken", "lora_path": "team/broken"})
    error = assert_openai_error(r, 400, "lora_path", "corrupt", "team/broken")
    assert not any(p in error["message"] for p in server_paths(lora_root))
    missing = assert_openai_error(post(server, LOAD, {"lora_name": "hostile-missing", "lora_path": "team/nothing-here"}), 400, "lora_path")
    assert not any(p in missing["message"] for p in server_paths(lora_root))
    assert_still_serving(server)


def test_hide_paths():
    paths = {"/srv/loras": "", "/srv/models/qwen": "base", "/opt/adapters/sql": "sql"}
    assert hide_paths("weights file in '/srv/loras/team/x' is corrupt", paths) == "weights file in 'team/x' is corrupt"
    assert hide_paths("'/srv/loras' itself", paths) == "'.' itself"
    assert hide_paths("/srv/loras2/x and /srv/models/qwen/config.json", paths) == "/srv/loras2/x and base/config.json"
    assert hide_paths("adapter at /opt/adapters/sql: bad", paths) == "adapter at sql: bad"
    assert hide_paths("/data/srv/loras/x", paths) == "/data/srv/loras/x"  # not that folder
    assert hide_paths("a sentence. another.", {".": "base", "models/qwen": "base"}) == "a sentence. another."  # absolute paths only


# What OpenAI clients send by default (or echo back) is accepted when it asks for nothing, and changes nothing.
def test_neutral_values_of_unimplemented_fields_are_accepted_and_change_nothing(server):
    prompt = prompt_for(11)
    neutral = {
        "logit_bias": {}, "echo": False, "best_of": 1, "suffix": None, "user": "someone", "response_format": {"type": "text"},
        "prompt_logprobs": None, "guided_json": None, "seed": None, "stop": None, "n": None, "temperature": 0, "top_p": 1,
    }
    r = post(server, COMPLETIONS, {"model": "base", "prompt": prompt, "max_tokens": 12, **neutral})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected_continuation("base", prompt)
    chat = {
        "model": "base", "max_completion_tokens": 4, "temperature": 0, "logit_bias": None, "tool_choice": "none", "tools": [],
        "parallel_tool_calls": True, "response_format": {"type": "text"}, "modalities": ["text"], "store": False, "metadata": {},
        "service_tier": "auto", "user": "someone", "stream": True, "stream_options": {"include_usage": True}, "logprobs": None,
        "messages": [
            {"role": "system", "content": "count"},
            {"role": "user", "content": [{"type": "text", "text": "count: 1 2"}]},
            # an assistant message echoed back from a response, as the openai client serializes it
            {"role": "assistant", "content": " 3", "refusal": None, "annotations": None, "audio": None, "function_call": None, "tool_calls": None},
            {"role": "user", "content": "more", "name": None},
        ],
    }
    r = post(server, CHAT, chat)
    assert r.status_code == 200, r.text
    assert r.text.rstrip().endswith("data: [DONE]")
    # the openai client, with the fields it sends for such choices
    out = server.client().chat.completions.create(
        model="base", messages=[{"role": "user", "content": "count: 1 2"}], max_tokens=4, temperature=1, seed=3,
        tool_choice="none", response_format={"type": "text"}, user="u", logit_bias={}, parallel_tool_calls=False,
    )
    assert out.choices[0].message.role == "assistant"
    assert_still_serving(server)


class BrokenEngine:
    """An engine whose every use fails unexpectedly (in-process: no real server can be made to do this on purpose)."""

    failed = None

    def __getattr__(self, name):
        raise RuntimeError(f"unexpected failure reading {BASE_DIR}/model.safetensors")


def test_an_unexpected_error_is_a_500_in_openai_shape_without_server_paths():
    from fastapi.testclient import TestClient

    from hylo.server.app import ServerState, build_app

    client = TestClient(build_app(ServerState(BrokenEngine(), "base", str(BASE_DIR))), raise_server_exceptions=False)
    error = assert_openai_error(client.post(COMPLETIONS, json=C), 500, None, "RuntimeError", "base/model.safetensors")
    assert str(BASE_DIR) not in error["message"]


# Beyond issue 12's list.
def test_a_huge_refused_value_is_not_echoed_back(server):
    """A 10,000-element stop list (or a million stop_token_ids) was quoted whole in the 400's message: megabytes."""
    for body, param in (({**C, "stop": ["stop here"] * 10_000}, "stop"), ({**C, "stop_token_ids": [-1] * 1_000_000}, "stop_token_ids")):
        error = assert_openai_error(post(server, COMPLETIONS, body), 400, param, param, "items")
        assert len(error["message"]) < 300, len(error["message"])
    assert_still_serving(server)


def test_a_top_p_below_float32_resolution_samples_the_top_token(server):
    """top_p=1e-320 is in (0, 1] but 0 in float32: sampling kept no token and the request failed with a 500."""
    prompt = prompt_for(11)
    for body in ({"model": "base", "prompt": prompt, "max_tokens": 12, "temperature": 1, "top_p": 1e-320, "seed": 4},
                 {"model": "base", "prompt": prompt, "max_tokens": 12, "temperature": 1, "top_p": 1e-300}):
        r = post(server, COMPLETIONS, body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected_continuation("base", prompt)  # the top token alone: greedy
    assert_still_serving(server)


def test_a_deeply_nested_body_is_screened_in_linear_time(server):
    """The Unicode screen copied each item's path: 600 kB nested 900 deep held the event loop (and /health) for 3 s."""
    import time

    items = b"1," * 300_000
    for tail, param in ((b"1", "frobnicate"), (b'"\\ud800"', "frobnicate" + "[0]" * 899 + "[300000]")):
        nested = b"[" * 900 + items + tail + b"]" * 900
        t = time.monotonic()
        r = post(server, COMPLETIONS, content=b'{"model": "base", "prompt": "x", "frobnicate": ' + nested + b"}")
        took = time.monotonic() - t
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text[:300]
        assert took < 1.5, f"{took:.1f} s to refuse a {len(nested) >> 10} kB body"
    assert_still_serving(server)

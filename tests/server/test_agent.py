"""Reasoning and tool calling through the server (issue 14, items 1 and 2).

- The Responder (the chat route's streaming and whole responses) on fixed model outputs, cut at every point:
  a random-weight model cannot be made to think or call a tool, so the parsing is tested on fixed text.
- A real `hylo serve --reasoning-parser qwen3 --enable-auto-tool-choice --tool-call-parser qwen3_coder` on the
  demo checkpoint with a Qwen3.5-format chat template, through the `openai` client: what reaches the
  template (read back exactly), the reasoning split of what the model does write, streamed and not, usage,
  and the refusals.
"""

import asyncio
import json

import openai
import pytest

from hylo.outputs import CompletionOutput, RequestOutput
from hylo.parsers import output_parser
from hylo.sampling import SamplingParams
from hylo.server.app import Responder
from tests.parsers.test_tool_calls import TOOLS, call
from tests.qwen3_5_template import ECHO, qwen3_5_demo
from tests.server.conftest import KEY, Server

PROMPT = "<|im_start|>user\nweather?<|im_end|>\n<|im_start|>assistant\n<think>\n"
OUTPUT = "Paris, then <b>Rome</b>.\n</think>\n\nOn it.\n\n" + call("get_weather", city="Paris", days="2") + "\n" + call("get_weather", city="Rome")


# -- the Responder on fixed outputs ---------------------------------------------------------------

def outputs(cuts: list[int], text: str = OUTPUT, reason: str = "stop") -> list[tuple[int, RequestOutput]]:
    """The engine's cumulative outputs for `text` arriving in pieces ending at `cuts`."""
    outs = []
    for i, end in enumerate(cuts + [len(text)]):
        done = i == len(cuts)
        c = CompletionOutput(0, text[:end], list(range(i + 1)), None, None, reason if done else None)
        outs.append((0, RequestOutput("r", None, [1, 2, 3], [c], finished=done)))
    return outs


def responder() -> Responder:
    return Responder("chatcmpl-x", "m", True, SamplingParams(max_tokens=100), lambda: output_parser("qwen3", PROMPT, None, "qwen3_coder", TOOLS))


def stream(outs) -> list[dict]:
    async def rest():
        for item in outs[1:]:
            yield item

    async def run():
        return [e async for e in responder().sse(outs[0], rest(), include_usage=True)]

    events = asyncio.run(run())
    assert events[-1] == "data: [DONE]\n\n"
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]]


def accumulate(chunks: list[dict]) -> tuple[dict, str]:
    """The message an OpenAI client builds from the chunks, and the finish reason."""
    message, finish = {"role": None, "content": "", "reasoning_content": "", "reasoning": "", "tool_calls": []}, None
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            message["role"] = message["role"] or delta.get("role")
            for key in ("content", "reasoning_content", "reasoning"):
                message[key] += delta.get(key) or ""
            for piece in delta.get("tool_calls", []):
                if piece["index"] == len(message["tool_calls"]):
                    assert piece["id"].startswith("call_") and piece["type"] == "function" and piece["function"]["name"]
                    message["tool_calls"].append({"id": piece["id"], "type": "function", "function": {"name": piece["function"]["name"], "arguments": ""}})
                else:
                    assert "id" not in piece and "name" not in piece["function"]
                message["tool_calls"][piece["index"]]["function"]["arguments"] += piece["function"]["arguments"]
            finish = choice["finish_reason"] or finish
    return message, finish


def without_ids(message: dict) -> dict:
    return {**message, "tool_calls": [{**c, "id": None} for c in message.get("tool_calls") or []]}


def test_whole_response():
    choice = responder().whole([outputs([])[0][1]])["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["role"] == "assistant" and message["content"] == "On it."
    assert message["reasoning_content"] == message["reasoning"] == "Paris, then <b>Rome</b>."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        ("get_weather", {"city": "Paris", "days": 2}), ("get_weather", {"city": "Rome"})]
    assert len({c["id"] for c in message["tool_calls"]}) == 2


@pytest.mark.parametrize("k", range(1, len(OUTPUT)))
def test_streamed_equals_whole_at_every_cut(k):
    whole = responder().whole([outputs([])[0][1]])["choices"][0]
    chunks = stream(outputs([k]))
    message, finish = accumulate(chunks)
    assert without_ids(message) == without_ids(whole["message"])
    assert finish == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] == 2  # every token counted, thinking included


def test_streamed_token_by_token_with_held_back_text():
    whole = responder().whole([outputs([])[0][1]])["choices"][0]
    chunks = stream(outputs(list(range(1, len(OUTPUT)))))
    assert without_ids(accumulate(chunks)[0]) == without_ids(whole["message"])
    assert all(c["choices"] for c in chunks[:-1]) and chunks[-1]["usage"]["completion_tokens"] == len(OUTPUT)


def test_a_call_cut_by_max_tokens_finishes_with_length():
    text = OUTPUT[: OUTPUT.index("Rome\n") + 2]
    whole = responder().whole([outputs([], text, "length")[0][1]])["choices"][0]
    assert whole["finish_reason"] == "length" and json.loads(whole["message"]["tool_calls"][1]["function"]["arguments"]) == {"city": "Ro"}
    assert accumulate(stream(outputs([5, 40], text, "length")))[1] == "length"


# -- a real server -------------------------------------------------------------------------------

WEATHER_TOOLS = [TOOLS[0]]
ARGS = {"city": "Paris", "days": 2, "options": {"lang": "fr"}}
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "count: 3 4 5"},
    {"role": "assistant", "content": None, "reasoning_content": "I need the weather.",
     "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(ARGS)}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return qwen3_5_demo(tmp_path_factory.mktemp("qwen3_5"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def agent(model_dir):
    s = Server(model_dir, "--api-key", KEY, "--served-model-name", "q", "--max-model-len", "4096",
               "--reasoning-parser", "qwen3", "--enable-auto-tool-choice", "--tool-call-parser", "qwen3_coder")
    yield s
    assert s.stop()


def rendered(server: Server, **request) -> str:
    """The prompt the server's chat template rendered for this request (the test template echoes it)."""
    kwargs = request.pop("chat_template_kwargs", {})
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="q", max_tokens=1, **request, extra_body={"chat_template_kwargs": {**kwargs, "echo_prompt": True}})
    return e.value.body["message"].split(ECHO, 1)[1]


def complete(server: Server, prompt: str, **kwargs) -> str:
    return server.client().completions.create(model="q", prompt=prompt, temperature=0, **kwargs).choices[0].text


def test_tools_and_a_tool_history_reach_the_template_intact(agent, tokenizer):
    messages = HISTORY[1:]
    local_messages = [*messages[:1], {**messages[1], "content": "", "tool_calls": [{**messages[1]["tool_calls"][0], "function": {"name": "get_weather", "arguments": ARGS}}]}, messages[2]]
    expected = tokenizer.apply_chat_template(local_messages, tools=WEATHER_TOOLS, tokenize=False, add_generation_prompt=True)
    assert "<function=get_weather>\n<parameter=city>\nParis\n</parameter>" in expected and "<name>get_weather</name>" in expected
    assert "<think>\nI need the weather.\n</think>" in expected and "<tool_response>\nsunny\n</tool_response>" in expected
    assert rendered(agent, messages=messages, tools=WEATHER_TOOLS) == expected
    # The prompt generated from is that one: every one of its tokens counted.
    out = agent.client().chat.completions.create(model="q", messages=messages, tools=WEATHER_TOOLS, max_tokens=3, temperature=0)
    assert out.usage.prompt_tokens == len(tokenizer.encode(expected, add_special_tokens=False))


def test_tool_choice_none_shows_the_tools_and_parses_nothing(agent, tokenizer):
    messages = [{"role": "user", "content": "count: 3 4 5"}]
    expected = tokenizer.apply_chat_template(messages, tools=WEATHER_TOOLS, tokenize=False, add_generation_prompt=True)
    assert rendered(agent, messages=messages, tools=WEATHER_TOOLS, tool_choice="none") == expected
    out = agent.client().chat.completions.create(model="q", messages=messages, tools=WEATHER_TOOLS, tool_choice="none", max_tokens=6, temperature=0)
    assert out.choices[0].message.tool_calls is None


def test_thinking_goes_to_reasoning_content_streamed_and_not(agent, tokenizer):
    messages = [{"role": "user", "content": "count: 3 4 5"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")  # Qwen3.5 opens the thinking block in the prompt
    raw = complete(agent, prompt, max_tokens=10)
    assert raw.strip() and "</think>" not in raw  # the demo model counts: it thinks until max_tokens
    client = agent.client()
    whole = client.chat.completions.create(model="q", messages=messages, max_tokens=10, temperature=0)
    message = whole.choices[0].message
    assert message.reasoning_content == message.reasoning == raw.strip() and message.content is None and message.tool_calls is None
    assert whole.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="q", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message.reasoning_content
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == message.reasoning_content
    assert not any(d.content for d in deltas)
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))


def test_enable_thinking_false_is_all_content(agent, tokenizer):
    messages = [{"role": "user", "content": "count: 3 4 5"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<think>\n\n</think>\n\n")
    raw = complete(agent, prompt, max_tokens=8, extra_body={"ignore_eos": True})
    client, kwargs = agent.client(), {"chat_template_kwargs": {"enable_thinking": False}, "ignore_eos": True}
    whole = client.chat.completions.create(model="q", messages=messages, max_tokens=8, temperature=0, extra_body=kwargs)
    assert whole.choices[0].message.content == raw and whole.choices[0].message.reasoning_content is None
    streamed = list(client.chat.completions.create(model="q", messages=messages, max_tokens=8, temperature=0, stream=True, extra_body=kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == raw
    assert not any(getattr(c.choices[0].delta, "reasoning_content", None) for c in streamed)


def test_the_history_a_client_sends_back_is_taken(agent):
    """An agent loop appends the response message (reasoning_content, tool_calls, None content) and tool results."""
    client = agent.client()
    first = client.chat.completions.create(model="q", messages=[{"role": "user", "content": "count: 3 4 5"}], max_tokens=4, temperature=0)
    messages = [{"role": "user", "content": "count: 3 4 5"}, first.choices[0].message.model_dump(exclude_none=True), *HISTORY[2:]]
    out = client.chat.completions.create(model="q", messages=messages, tools=WEATHER_TOOLS, max_tokens=4, temperature=0)
    assert out.choices[0].message.role == "assistant"


@pytest.mark.parametrize(
    "request_fields, param, words",
    [
        ({"tool_choice": "required"}, "tool_choice", ("needs tools",)),
        ({"tools": WEATHER_TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice.function.name", ("get_time", "not among the tools")),
        ({"tools": WEATHER_TOOLS, "tool_choice": {"type": "function", "name": "get_weather"}}, "tool_choice", ("\"required\" or {\"type\": \"function\", \"function\": {\"name\": NAME}}",)),
        ({"tools": WEATHER_TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", ("give one of them",)),
        ({"tools": [{"type": "function", "function": {**WEATHER_TOOLS[0]["function"], "strict": "yes"}}]}, "tools[0].function.strict", ("true or false",)),
        ({"tools": WEATHER_TOOLS * 2}, "tools[1].function.name", ("two tools",)),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", ("function name",)),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id", ("tool_call_id",)),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
         "messages[0].tool_calls[0].function.arguments", ("JSON",)),
        ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, "messages[0].tool_call_id", ("tool messages",)),
    ],
)
def test_what_tool_calling_cannot_honour_is_refused(agent, request_fields, param, words):
    body = {"model": "q", "max_tokens": 2, "messages": [{"role": "user", "content": "count: 1 2"}], **request_fields}
    with pytest.raises(openai.BadRequestError) as e:
        agent.client().chat.completions.create(**body)
    assert e.value.body["param"] == param
    for word in words:
        assert word in e.value.body["message"]


def test_a_server_without_auto_tool_choice_or_reasoning_parser(model_dir, tokenizer):
    s = Server(model_dir, "--api-key", KEY, "--served-model-name", "q", "--max-model-len", "4096", "--tool-call-parser", "qwen3_coder")
    try:
        messages = [{"role": "user", "content": "count: 3 4 5"}]
        with pytest.raises(openai.BadRequestError) as e:
            s.client().chat.completions.create(model="q", messages=messages, tools=WEATHER_TOOLS, max_tokens=2)
        assert e.value.body["param"] == "tool_choice" and "--enable-auto-tool-choice" in e.value.body["message"]
        out = s.client().chat.completions.create(model="q", messages=messages, tools=WEATHER_TOOLS, tool_choice="none", max_tokens=4, temperature=0)
        prompt = tokenizer.apply_chat_template(messages, tools=WEATHER_TOOLS, tokenize=False, add_generation_prompt=True)
        assert out.choices[0].message.content == complete(s, prompt, max_tokens=4)  # no reasoning parser: the thinking is content
        assert getattr(out.choices[0].message, "reasoning_content", None) is None
        with pytest.raises(openai.BadRequestError) as e:
            s.client().chat.completions.create(model="q", max_tokens=2, messages=[*messages, {"role": "assistant", "content": "x", "reasoning_content": "r"}])
        assert e.value.body["param"] == "messages[1].reasoning_content" and "--reasoning-parser qwen3" in e.value.body["message"]
    finally:
        assert s.stop()


def test_auto_tool_choice_needs_a_parser():
    with pytest.raises(RuntimeError, match="--enable-auto-tool-choice needs --tool-call-parser"):
        Server("--enable-auto-tool-choice")

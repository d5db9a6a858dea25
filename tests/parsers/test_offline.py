"""The offline API has the server's features under the same names: LLM(reasoning_parser=..., tool_call_parser=...)
and LLM.chat(..., tools=...)."""

import json

import pytest

from hylo import LLM, SamplingParams
from tests.parsers.test_tool_calls import TOOLS
from tests.qwen3_5_template import qwen3_5_demo

MESSAGES = [{"role": "user", "content": "count: 3 4 5"}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    llm = LLM(qwen3_5_demo(tmp_path_factory.mktemp("qwen3_5")), device="cpu", progress=False, max_model_len=4096,
              reasoning_parser="qwen3", tool_call_parser="qwen3_coder")
    yield llm
    llm.shutdown()


def test_chat_splits_the_thinking(llm):
    params = SamplingParams(temperature=0, max_tokens=10)
    prompt = llm.get_tokenizer().apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    raw = llm.generate(prompt, params)[0].outputs[0].text
    out = llm.chat(MESSAGES, params)[0].outputs[0]
    assert prompt.endswith("<think>\n") and out.text == raw  # text stays the whole output
    assert out.reasoning_content == raw.strip() and out.content is None and out.tool_calls is None


def test_chat_with_thinking_off(llm):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    out = llm.chat(MESSAGES, params, chat_template_kwargs={"enable_thinking": False})[0].outputs[0]
    assert out.content == out.text and out.reasoning_content is None


def test_chat_tools_and_tool_history_reach_the_template(llm):
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 2})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    out = llm.chat(history, SamplingParams(temperature=0, max_tokens=2), tools=TOOLS)[0]
    local = [*history[:1], {**history[1], "content": "", "tool_calls": [{**history[1]["tool_calls"][0], "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]}, history[2]]
    prompt = llm.get_tokenizer().apply_chat_template(local, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert "<parameter=days>\n2\n</parameter>" in prompt and "<name>write_file</name>" in prompt
    assert out.prompt == prompt


def test_unknown_parser_names_are_refused():
    with pytest.raises(ValueError, match="qwen3_coder"):
        LLM("unused", tool_call_parser="hermes")

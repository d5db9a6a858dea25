"""Text in and out: tokenizer, incremental detokenization, stop strings, chat template."""

import pytest

from hylo import SamplingParams
from hylo.engine.detokenizer import IncrementalDetokenizer
from hylo.sampling import InvalidParam
from tests.conftest import build_tokenizer

TEXT = "héllo wörld ✓ 日本語, the lazy données"


def test_incremental_detokenization_never_splits_a_character():
    tok = build_tokenizer()
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT.encode()) // 3, "the test needs tokens that split multi-byte characters"
    detok = IncrementalDetokenizer(tok, tok.encode("prefix ", add_special_tokens=False), skip_special_tokens=True)
    pieces = [detok.add(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == TEXT


def test_output_text_equals_decoding_the_output_tokens(engines):
    llm = engines("dense")
    out = llm.generate("the quick brown", SamplingParams(temperature=0, max_tokens=25, ignore_eos=True))[0]
    tok = llm.get_tokenizer()
    assert out.prompt_token_ids == tok.encode("the quick brown", add_special_tokens=False)
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_stop_string_ends_generation_and_is_not_emitted(engines):
    llm = engines("moe")
    free = llm.generate("count: 1 2", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {text!r}"
    out = llm.generate("count: 1 2", SamplingParams(temperature=0, max_tokens=30, stop=[stop, "never-there"], ignore_eos=True))[0].outputs[0]
    assert out.text == text[: text.index(stop)]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert len(out.token_ids) < len(free.token_ids)


def test_chat_uses_the_checkpoint_template(engines):
    llm = engines("dense")
    messages = [{"role": "user", "content": "hi"}]
    chat = llm.chat(messages, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    plain = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert chat.prompt == prompt
    assert chat.outputs[0].token_ids == plain.outputs[0].token_ids


def test_chat_takes_a_template_given_with_the_call(engines):
    llm = engines("dense")
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[bot] {% endif %}"
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), chat_template=template)[0]
    assert chat.prompt == "[user] hi\n[bot] "
    with pytest.raises(InvalidParam, match="chat_template"):
        llm.chat([{"role": "user", "content": "hi"}], chat_template=["not", "a", "template"])


def test_length_finish_reason(engines):
    out = engines("dense").generate("the", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].outputs[0]
    assert (len(out.token_ids), out.finish_reason) == (4, "length")


def test_generation_stops_at_max_model_len(engines):
    llm = engines("dense", max_model_len=20)
    out = llm.generate({"prompt_token_ids": list(range(1, 16))}, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert (len(out.outputs[0].token_ids), out.outputs[0].finish_reason) == (5, "length")

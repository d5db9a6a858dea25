"""Compiling constraints: cached by spec, off the calling thread, errors that name what is wrong (and no C++
source paths), JSON strings narrowed to what JSON allows, bounded whitespace, the constraint after thinking."""

import threading
import time

import pytest

from hylo.structured import GrammarCompiler, GrammarError, StructuredOutputsParams
from hylo.structured.compiler import MAX_WHITESPACE_RUN
from tests.conftest import TEXT, build_tokenizer


@pytest.fixture(scope="module")
def compiler():
    c = GrammarCompiler(build_tokenizer(), TEXT["vocab_size"], [0])
    yield c
    c.close()


def accepts(compiler: GrammarCompiler, text: str, **constraint) -> bool:
    """Whether the constraint's grammar takes exactly `text` (then a stop token)."""
    matcher = compiler.matcher(compiler.compile(StructuredOutputsParams(**constraint).spec()).result())
    return matcher.accept_string(text) and matcher.accept_token(0) and matcher.is_terminated()


def test_the_same_spec_is_compiled_once(compiler):
    spec = StructuredOutputsParams(regex="[0-9]{3}").spec()
    assert compiler.compile(spec) is compiler.compile(StructuredOutputsParams(regex="[0-9]{3}").spec())
    assert compiler.compile(spec).result() is not None


def test_compiling_runs_on_a_worker_thread(compiler):
    big = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(3000)}}
    start = time.monotonic()
    future = compiler.compile(StructuredOutputsParams(json=big).spec())
    assert time.monotonic() - start < 0.5 and threading.current_thread() is threading.main_thread()
    assert future.result(timeout=120) is not None


@pytest.mark.parametrize(
    "constraint, kind, words",
    [
        (dict(json={"type": "wat"}), "json", ("JSON schema", "wat")),
        (dict(json='{"type": '), "json", ("JSON schema",)),
        (dict(json={"$ref": "#/nowhere"}), "json", ("JSON schema",)),
        (dict(regex="a(b"), "regex", ("regex", "parenthesis")),
        (dict(regex="(a|aa)*{1,1000}b"), "regex", ("regex",)),
        (dict(grammar="root ::= nothing"), "grammar", ("EBNF", "nothing")),
        (dict(grammar="not a grammar"), "grammar", ("EBNF",)),
    ],
)
def test_what_cannot_be_compiled_says_why(compiler, constraint, kind, words):
    with pytest.raises(GrammarError) as e:
        compiler.compile(StructuredOutputsParams(**constraint).spec()).result()
    assert e.value.kind == kind
    for word in words:
        assert word in e.value.why
    assert ".cc:" not in e.value.why and "/project" not in e.value.why


def test_length_bounded_strings_take_no_raw_control_characters(compiler):
    """xgrammar 0.2 lets U+0000-U+001F into strings with maxLength; JSON does not."""
    schema = {"type": "string", "maxLength": 6}
    assert accepts(compiler, '"ab c"', json=schema)
    for bad in ('"a\x0c"', '"a\x01"', '"a\t"'):
        assert not accepts(compiler, bad, json=schema)


def test_whitespace_runs_are_bounded(compiler):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert accepts(compiler, '{' + " " * MAX_WHITESPACE_RUN + '"a": 1}', json=schema)
    assert not accepts(compiler, '{' + " " * (MAX_WHITESPACE_RUN + 1) + '"a": 1}', json=schema)
    assert not accepts(compiler, '{ "a": 1}', json=schema, disable_any_whitespace=True)
    assert accepts(compiler, '{"a": 1}', json=schema, disable_any_whitespace=True)


def test_choices_are_exact_strings(compiler):
    choices = ['say "hi"', "back\\slash", "two\nlines", "日本語"]
    for c in choices:
        assert accepts(compiler, c, choice=choices)
    assert not accepts(compiler, "say hi", choice=choices) and not accepts(compiler, "日本", choice=choices)


def test_after_thinking_the_constraint_holds_from_the_end_of_the_thinking(compiler):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert accepts(compiler, 'free {thoughts} "here"</think>\n\n{"a": 1}', json=schema, after_thinking=True)
    assert not accepts(compiler, 'thoughts</think>\n\nnot json', json=schema, after_thinking=True)
    assert not accepts(compiler, '{"a": 1}', json=schema, after_thinking=True)  # the thinking block must close first
    assert accepts(compiler, "hmm</think>\n\nabc", regex="[a-c]+", after_thinking=True)
    assert accepts(compiler, "x</think>\n\nno", choice=["yes", "no"], after_thinking=True)


def test_a_model_vocabulary_wider_than_the_tokenizer_masks_the_padding():
    """Qwen3.5's logits are wider than its tokenizer: the ids past the tokenizer are never allowed."""
    import torch
    import xgrammar as xgr

    wide = TEXT["vocab_size"] + 37
    compiler = GrammarCompiler(build_tokenizer(), wide, [0])
    try:
        matcher = compiler.matcher(compiler.compile(StructuredOutputsParams(json_object=True).spec()).result())
        bitmask = xgr.allocate_token_bitmask(1, wide)
        matcher.fill_next_token_bitmask(bitmask)
        logits = torch.zeros(1, wide)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=wide)
        allowed = torch.isfinite(logits[0]).nonzero()[:, 0].tolist()
        assert allowed and max(allowed) < TEXT["vocab_size"]
    finally:
        compiler.close()


def test_source_locations_are_cut_inside_a_message_too():
    """xgrammar nests its messages: "Failed to parse JSON: [03:33:15] /project/cpp/support/recursion_guard.h:36: ..."."""
    from hylo.structured.compiler import xgrammar_message

    message = xgrammar_message(RuntimeError("[03:33:14] /project/cpp/json_schema.cc:12: Failed to parse JSON: [03:33:15] "
                                            "/project/cpp/support/recursion_guard.h:36: Check failed: (depth < 10000) is false: too deep"))
    assert message == "Failed to parse JSON: too deep"

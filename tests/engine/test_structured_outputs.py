"""Structured outputs offline: a random tiny model's output parses and validates against its constraint, whatever
else shares the batch (free requests, adapters, other constraints), at TP 1 and 2; bad constraints are refused
before anything runs; a constraint that leaves no token fails its request alone."""

import json
import re
import time

import jsonschema
import pytest

from hylo import LLM, LoRARequest, SamplingParams, StructuredOutputsParams
from hylo.engine.engine import LLMEngine
from hylo.sampling import InvalidParam
from tests.conftest import MAX_RANK

# Strings carry maxLength (a random model rarely closes a quote on its own); everything else is as a user writes it.
SCHEMAS = {
    "object with required keys": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
    },
    "enums": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3]}}, "required": ["color", "size"]},
    "array": {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9}, "minItems": 2, "maxItems": 4},
    "nested": {
        "type": "object",
        "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"],
                                 "additionalProperties": False},
                       "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
        "required": ["point", "tags"], "additionalProperties": False,
    },
    "scalars": {"type": "object", "properties": {"i": {"type": "integer"}, "f": {"type": "number", "minimum": 0, "maximum": 1}, "b": {"type": "boolean"}},
                "required": ["i", "f", "b"]},
}
SAMPLING = [dict(temperature=0), dict(temperature=1.0, seed=1), dict(temperature=0.8, top_p=0.9, seed=2)]
PROMPT = "count: 1 2 3"


def constrained(max_tokens: int = 200, n: int = 1, **constraint) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=max_tokens, n=n, structured_outputs=StructuredOutputsParams(**constraint), **s) for s in SAMPLING]


def assert_valid_json(out, schema: dict) -> None:
    for c in out.outputs:
        assert c.finish_reason == "stop", (c.text, c.finish_reason, out.error)
        jsonschema.validate(json.loads(c.text), schema)


@pytest.fixture(scope="module")
def llm(engines):
    return engines("dense", enable_lora=True, max_loras=2, max_lora_rank=MAX_RANK)  # shared: adapter ids here are 9101 and up


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_each_schema_gives_json_that_validates(llm, name):
    schema = SCHEMAS[name]
    n = 2 if name == "object with required keys" else 1
    for out in llm.generate([PROMPT] * len(SAMPLING), constrained(n=n, json=schema)):
        assert_valid_json(out, schema)
    compact = llm.generate(PROMPT, SamplingParams(max_tokens=200, temperature=0, structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True)))[0]
    assert_valid_json(compact, schema)
    assert not re.search(r"[\t\r\n]", compact.outputs[0].text)


def test_json_object_regex_choice_and_grammar(llm):
    outs = llm.generate([PROMPT] * len(SAMPLING), constrained(max_tokens=300, json_object=True))
    for out in outs:
        if out.outputs[0].finish_reason == "stop":  # a JSON object of free strings may still be open at max_tokens
            assert isinstance(json.loads(out.outputs[0].text), dict)
    assert any(out.outputs[0].finish_reason == "stop" for out in outs)
    for out in llm.generate([PROMPT] * len(SAMPLING), constrained(regex=r"[a-c]{2,4}-\d{3}(\.[xyz])?")):
        assert re.fullmatch(r"[a-c]{2,4}-\d{3}(\.[xyz])?", out.outputs[0].text) and out.outputs[0].finish_reason == "stop"
    choices = ["yes", "no", "it \"depends\"\n", "日本語 ✓"]
    texts = {out.outputs[0].text for out in llm.generate([PROMPT] * 3 * len(SAMPLING), constrained(choice=choices) * 3)}
    assert texts <= set(choices)
    grammar = 'root ::= "(" expr ")"\nexpr ::= num | num "+" expr\nnum ::= [1-9]'
    for out in llm.generate([PROMPT] * len(SAMPLING), constrained(grammar=grammar)):
        assert re.fullmatch(r"\([1-9](\+[1-9])*\)", out.outputs[0].text), out.outputs[0].text


def test_a_mixed_batch_of_constraints_adapters_and_free_requests(llm, adapters):
    """Each row keeps its own mask: free rows sample exactly as they do alone, constrained rows validate, with
    and without adapters, in one batch."""
    sql, chat = LoRARequest("so-a1", 9101, adapters("dense", seed=31)), LoRARequest("so-a2", 9102, adapters("dense", seed=32))
    schema = SCHEMAS["object with required keys"]
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    requests = [
        (SamplingParams(max_tokens=200, temperature=0, structured_outputs=StructuredOutputsParams(json=schema)), sql),
        (free, None),
        (SamplingParams(max_tokens=60, temperature=1, seed=5, structured_outputs=StructuredOutputsParams(regex=r"\d{4}")), chat),
        (free, sql),
        (SamplingParams(max_tokens=60, temperature=0, structured_outputs=StructuredOutputsParams(choice=["up", "down"])), None),
        (free, chat),
    ]
    outs = llm.generate([PROMPT] * len(requests), [p for p, _ in requests], lora_request=[lora for _, lora in requests])
    assert_valid_json(outs[0], schema)
    assert re.fullmatch(r"\d{4}", outs[2].outputs[0].text)
    assert outs[4].outputs[0].text in ("up", "down")
    for i in (1, 3, 5):
        alone = llm.generate(PROMPT, free, lora_request=requests[i][1])[0]
        assert outs[i].outputs[0].token_ids == alone.outputs[0].token_ids
    # The constraint holds whichever adapter runs: the same schema, with each adapter and none.
    for lora in (None, sql, chat):
        assert_valid_json(llm.generate(PROMPT, requests[0][0], lora_request=lora)[0], schema)


def test_tensor_parallel_2_gives_the_same_valid_output(checkpoints, adapters, llm):
    schema = SCHEMAS["nested"]
    lora = LoRARequest("so-tp", 9103, adapters("dense", seed=33))
    params = [SamplingParams(max_tokens=200, temperature=0, structured_outputs=StructuredOutputsParams(json=schema)),
              SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=50, temperature=1, seed=9, structured_outputs=StructuredOutputsParams(regex="[a-f]{6}"))]
    loras = [lora, lora, None]
    expected = llm.generate([PROMPT] * 3, params, lora_request=loras)
    tp = LLM(checkpoints("dense"), device="cpu", progress=False, tensor_parallel_size=2, enable_lora=True, max_loras=2, max_lora_rank=MAX_RANK)
    try:
        outs = tp.generate([PROMPT] * 3, params, lora_request=loras)
    finally:
        tp.shutdown()
    assert_valid_json(outs[0], schema)
    assert re.fullmatch("[a-f]{6}", outs[2].outputs[0].text)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]


def test_a_complete_grammar_ends_the_request_with_stop_even_with_ignore_eos(llm):
    out = llm.generate(PROMPT, SamplingParams(max_tokens=50, ignore_eos=True, temperature=0, structured_outputs=StructuredOutputsParams(choice=["done"])))[0]
    assert out.outputs[0].text == "done" and out.outputs[0].finish_reason == "stop"


def test_a_dead_end_fails_its_request_alone(llm):
    """After "yes" only a stop token may come, and min_tokens holds the stop tokens back: no token is left."""
    dead = SamplingParams(max_tokens=20, min_tokens=10, temperature=0, structured_outputs=StructuredOutputsParams(choice=["yes"]))
    free = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = llm.generate([PROMPT, PROMPT, PROMPT], [free, dead, free])
    assert outs[1].outputs[0].finish_reason == "error" and "no token may come next" in outs[1].error and "min_tokens" in outs[1].error
    assert outs[0].error is None and len(outs[0].outputs[0].token_ids) == 8 and outs[0].outputs[0].token_ids == outs[2].outputs[0].token_ids
    dead = SamplingParams(max_tokens=20, temperature=0, allowed_token_ids=[5, 6], structured_outputs=StructuredOutputsParams(regex="z+"))
    out = llm.generate(PROMPT, dead)[0]
    assert out.outputs[0].finish_reason == "error" and "allowed_token_ids" in out.error


def test_a_dead_end_is_the_requests_own_failure_not_an_engine_error(llm, caplog):
    """Constraints that contradict each other are the request's doing: its failure is logged as a warning naming
    it, without the ERROR and traceback of a sampler that broke."""
    dead = SamplingParams(max_tokens=20, temperature=0, allowed_token_ids=[5, 6], structured_outputs=StructuredOutputsParams(regex="z+"))
    free = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = llm.generate([PROMPT, PROMPT], [free, dead])
    assert outs[1].outputs[0].finish_reason == "error" and outs[0].error is None
    assert not [r for r in caplog.records if r.levelname == "ERROR" or r.exc_info], [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize(
    "constraint, param, words",
    [
        (dict(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}), "structured_outputs.json", ("JSON schema", "nonsense")),
        (dict(json="{not json"), "structured_outputs.json", ("JSON schema",)),
        (dict(regex="a(b"), "structured_outputs.regex", ("regex", "parenthesis")),
        (dict(grammar="root ::= undefined_rule"), "structured_outputs.grammar", ("EBNF", "undefined_rule")),
        (dict(choice=[]), "structured_outputs.choice", ("non-empty list",)),
        (dict(choice=["a", ""]), "structured_outputs.choice", ("[1]",)),
        (dict(json={"a": {1, 2}}), "structured_outputs.json", ("not JSON data",)),
        (dict(json_object=False), "structured_outputs.json_object", ("True",)),
        (dict(regex="a", choice=["a"]), "structured_outputs", ("exactly one",)),
        (dict(), "structured_outputs", ("exactly one",)),
    ],
)
def test_a_bad_constraint_is_refused_before_anything_runs(llm, constraint, param, words):
    with pytest.raises(InvalidParam) as e:
        llm.generate(PROMPT, SamplingParams(max_tokens=5, structured_outputs=StructuredOutputsParams(**constraint)))
    assert e.value.param == param
    for word in words:
        assert word in str(e.value)
    assert "/project" not in str(e.value) and ".cc:" not in str(e.value)  # xgrammar's source locations are cut
    assert not llm.llm_engine.has_unfinished_requests()


def test_a_grammar_compiles_off_the_step_loop(checkpoints):
    """A request whose schema is still compiling waits; the batch goes on decoding meanwhile."""
    engine = engine_for(checkpoints)
    big = {"enum": [f"value number {i}" for i in range(8000)]}  # ~2 s to compile, a few tokens to write
    engine.add_request("big", PROMPT, SamplingParams(max_tokens=50, temperature=0, structured_outputs=StructuredOutputsParams(json=big)))
    engine.add_request("free", PROMPT, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    finished: dict[str, object] = {}
    start = time.monotonic()
    while len(finished) < 2 and time.monotonic() - start < 120:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert list(finished) == ["free", "big"]  # the free request ran while the schema compiled
    assert_valid_json(finished["big"], big)
    engine.shutdown()


def test_a_compile_whose_waiter_left_or_whose_engine_stopped_is_dropped_quietly(checkpoints, caplog):
    """The server cancels the Future that compile_grammar returned when its client disconnects mid-compile, and
    shutdown cancels the compiles still queued: neither may log an error (a traceback per disconnect) when the
    compile ends."""
    engine = engine_for(checkpoints)
    schemas = [{"enum": [f"value {k} number {i}" for i in range(4000)]} for k in range(4)]  # 2 compile threads: 2 queued
    futures = [engine.compile_grammar(SamplingParams(structured_outputs=StructuredOutputsParams(json=s))) for s in schemas]
    assert futures[0].cancel()  # the client went away
    engine.shutdown()  # the compiles that had not started are cancelled
    futures[1].result(timeout=60)  # the one running goes on to its end
    time.sleep(0.5)
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]
    assert all(f.done() for f in futures[2:])  # their waiters learn that they will not come


def engine_for(checkpoints) -> LLMEngine:
    from hylo.engine.config import EngineConfig

    return LLMEngine(EngineConfig(model=checkpoints("dense"), device="cpu"), progress=False)


def test_with_a_reasoning_parser_chat_constrains_the_answer_not_the_thinking(tmp_path):
    """Qwen3.5's template opens a thinking block; with reasoning_parser the constraint waits for its end (as vLLM),
    so the (counting) demo model thinks freely; with thinking off the answer is constrained from the first token."""
    from tests.qwen3_5_template import qwen3_5_demo

    llm = LLM(qwen3_5_demo(tmp_path), device="cpu", progress=False, reasoning_parser="qwen3")
    params = SamplingParams(max_tokens=6, temperature=0, structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    messages = [{"role": "user", "content": "count: 3 4 5"}]
    thinking = llm.chat(messages, params)[0].outputs[0]
    assert thinking.finish_reason == "length" and thinking.text not in ("yes", "no") and thinking.content is None
    answer = llm.chat(messages, params, chat_template_kwargs={"enable_thinking": False})[0].outputs[0]
    assert answer.text in ("yes", "no") and answer.content == answer.text and answer.finish_reason == "stop"
    llm.shutdown()

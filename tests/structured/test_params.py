"""StructuredOutputsParams: vLLM's names, one constraint at a time, refusals naming the field."""

import json

import pytest

from hylo import SamplingParams, StructuredOutputsParams
from hylo.sampling import InvalidParam
from hylo.structured.params import MAX_SPEC_CHARS


def test_each_kind_becomes_one_spec():
    assert StructuredOutputsParams(json={"type": "object"}).spec().text == '{"type": "object"}'
    assert StructuredOutputsParams(json='{"type": "integer"}').spec().kind == "json"
    assert StructuredOutputsParams(json_object=True).spec().kind == "json_object"
    assert StructuredOutputsParams(choice=["a", "b", "a"]).spec().text == 'root ::= "a" | "b"'
    assert not StructuredOutputsParams(regex="x", disable_any_whitespace=True).spec().any_whitespace
    # Equal constraints are equal specs (the compile cache's key); another option is another spec.
    assert StructuredOutputsParams(regex="x").spec() == StructuredOutputsParams(regex="x").spec()
    assert StructuredOutputsParams(regex="x").spec() != StructuredOutputsParams(regex="x", after_thinking=True).spec()


def _nested(depth: int) -> dict:
    schema = {"type": "object"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize(
    "fields, param",
    [
        (dict(), "structured_outputs"),
        (dict(json={}, regex="a"), "structured_outputs"),
        (dict(regex=""), "structured_outputs.regex"),
        (dict(grammar=5), "structured_outputs.grammar"),
        (dict(choice="ab"), "structured_outputs.choice"),
        (dict(choice=["a", 1]), "structured_outputs.choice"),
        (dict(json=[1]), "structured_outputs.json"),
        (dict(json={"x": float("nan")}), "structured_outputs.json"),
        (dict(json_object=False), "structured_outputs.json_object"),
        (dict(regex="a" * (MAX_SPEC_CHARS + 1)), "structured_outputs.regex"),
        (dict(regex="a", disable_any_whitespace="yes"), "structured_outputs.disable_any_whitespace"),
        (dict(json=_nested(5000)), "structured_outputs.json"),  # too deep for json.dumps: RecursionError, not a ValueError
        (dict(json=_nested(70)), "structured_outputs.json"),  # 140 JSON levels: compiling would take seconds
        (dict(json=json.dumps(_nested(70))), "structured_outputs.json"),
    ],
)
def test_refusals_name_the_field(fields, param):
    with pytest.raises(InvalidParam) as e:
        StructuredOutputsParams(**fields)
    assert e.value.param == param


def test_a_schema_nested_up_to_the_limit_is_taken():
    StructuredOutputsParams(json=_nested(60))
    StructuredOutputsParams(json=json.dumps(_nested(60)))
    StructuredOutputsParams(json="{not json")  # xgrammar names what is wrong, when compiling


def test_sampling_params_take_only_structured_outputs_params():
    with pytest.raises(InvalidParam) as e:
        SamplingParams(structured_outputs={"json": {}})
    assert e.value.param == "structured_outputs"
    params = SamplingParams(structured_outputs=StructuredOutputsParams(regex="a"))
    params.structured_outputs.regex = None  # changed after it was made: the engine's validate() sees it
    with pytest.raises(InvalidParam):
        params.validate()

"""One source of engine settings: every EngineConfig field is an LLM(...) option and a flag of `hylo serve` and
`hylo generate`, with the same name and default."""

import dataclasses

import pytest

from hylo import LLM
from hylo.cli import build_parser
from hylo.engine.config import EngineConfig, engine_config_from

FIELDS = [f for f in dataclasses.fields(EngineConfig) if f.name != "model"]


def parsed(command: str, *flags: str):
    return build_parser().parse_args([command, *flags])


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_every_engine_field_is_a_flag_with_its_default(command):
    args = parsed(command)
    for f in FIELDS:
        if command == "generate" and f.name == "seed":
            continue  # there --seed is the sampling seed
        assert getattr(args, f.name) == f.default, f"hylo {command} --{f.name.replace('_', '-')}"


def test_flags_reach_the_engine_config():
    args = parsed("serve", "-tp", "2", "--max-model-len", "123", "--enable-lora", "--gpu-memory-utilization", "0.5", "--max-n", "7")
    config = engine_config_from(args, model="m")
    assert (config.tensor_parallel_size, config.max_model_len, config.enable_lora, config.gpu_memory_utilization, config.max_n) == (2, 123, True, 0.5, 7)


def test_llm_takes_every_field_and_refuses_others(checkpoints):
    with pytest.raises(TypeError, match="unknown options max_num_tokens; it takes dtype"):
        LLM(checkpoints("dense"), device="cpu", max_num_tokens=5)
    llm = LLM(checkpoints("dense"), **{**{f.name: f.default for f in FIELDS}, "device": "cpu"}, progress=False)
    assert dataclasses.replace(llm.llm_engine.config, device="auto") == EngineConfig(model=checkpoints("dense"))
    llm.shutdown()


@pytest.mark.parametrize("option, value, message", [
    ("generation_config", 5, "generation_config=5 must be a string"),
    ("max_num_seqs", True, "max_num_seqs=True must be an integer"),
    ("max_model_len", "2048", "max_model_len='2048' must be an integer or None"),
    ("enable_lora", 1, "enable_lora=1 must be True or False"),
    ("gpu_memory_utilization", "0.9", "gpu_memory_utilization='0.9' must be a number"),
])
def test_an_option_of_the_wrong_type_is_refused_naming_it(checkpoints, option, value, message):
    with pytest.raises(TypeError, match=message):
        LLM(checkpoints("dense"), device="cpu", progress=False, **{option: value})


def test_an_integer_is_a_number(checkpoints):
    EngineConfig(model=checkpoints("dense"), gpu_memory_utilization=1).validate()

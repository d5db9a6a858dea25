"""Sampling defaults from generation_config.json (--generation-config auto | vllm | FOLDER), as vLLM applies them."""

import json
import os
from pathlib import Path

import pytest

from hylo import LLM, SamplingParams
from hylo.config import ModelError
from hylo.engine.generation_config import default_sampling

PROMPT = {"prompt_token_ids": [5, 17, 33, 60, 2, 9]}


def with_generation_config(source: str, folder: Path, **settings) -> str:
    """A copy of checkpoint `source` (files linked) whose generation_config.json also holds `settings`."""
    folder.mkdir()
    for f in Path(source).iterdir():
        if f.name != "generation_config.json":
            os.symlink(f, folder / f.name)
    raw = json.loads((Path(source) / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**raw, **settings}))
    return str(folder)


def test_the_files_defaults_apply_where_nothing_is_set(checkpoints, tmp_path):
    greedy = with_generation_config(checkpoints("dense"), tmp_path / "greedy", temperature=0.0, top_k=1, max_new_tokens=9, do_sample=False)
    llm = LLM(greedy, device="cpu", progress=False)
    try:
        defaults = llm.get_default_sampling_params()
        assert (defaults.temperature, defaults.top_k, defaults.max_tokens) == (0.0, 1, 9)
        reference = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))[0].outputs[0]
        out = llm.generate([PROMPT] * 3)  # no SamplingParams: the file's greedy defaults, every time
        assert all(o.outputs[0].token_ids == reference.token_ids[: len(o.outputs[0].token_ids)] for o in out)
        assert len(out[0].outputs[0].token_ids) == 9 or out[0].outputs[0].finish_reason == "stop"
        sampled = llm.generate(PROMPT, SamplingParams(temperature=1.0, max_tokens=9, seed=3, ignore_eos=True))[0].outputs[0]
        assert sampled.token_ids != reference.token_ids, "a SamplingParams given wins over the file"
    finally:
        llm.shutdown()
    ignored = LLM(greedy, device="cpu", progress=False, generation_config="vllm")
    try:
        assert ignored.get_default_sampling_params() == SamplingParams()
        outs = ignored.generate([PROMPT] * 4)  # hylo's defaults: temperature 1, 16 tokens
        assert any(o.outputs[0].token_ids[:9] != reference.token_ids for o in outs)
    finally:
        ignored.shutdown()


def test_a_folder_or_nothing(checkpoints, tmp_path):
    folder = tmp_path / "settings"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"top_p": 0.5, "repetition_penalty": 1.2, "presence_penalty": 1.5, "temperature": None}))
    model = Path(checkpoints("dense"))
    assert default_sampling(str(folder), model) == {"top_p": 0.5, "repetition_penalty": 1.2, "presence_penalty": 1.5}
    assert default_sampling("auto", model) == {}  # the checkpoint's file sets no sampling field
    assert default_sampling("auto", tmp_path) == {}  # no file at all: nothing
    with pytest.raises(ValueError, match="generation_config='.*empty': there is no generation_config.json in that folder; give auto"):
        default_sampling(str(tmp_path / "empty"), model)


def test_a_bad_value_in_the_file_is_refused_naming_it(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0}))
    with pytest.raises(ModelError, match=r"generation_config.json': top_p=0 is not a valid sampling default .* generation_config='vllm'"):
        default_sampling("auto", tmp_path)


def test_hylo_generate_takes_the_defaults_and_its_flags_win(checkpoints, tmp_path, capsys):
    from hylo.cli import main

    three = with_generation_config(checkpoints("dense"), tmp_path / "three", max_new_tokens=3)
    assert main(["generate", "--model", three, "--prompt", "the", "--ignore-eos", "--device", "cpu"]) == 0
    assert "\n3 tokens in" in capsys.readouterr().out
    assert main(["generate", "--model", three, "--prompt", "the", "--ignore-eos", "--device", "cpu", "--max-tokens", "5"]) == 0
    assert "\n5 tokens in" in capsys.readouterr().out
    assert main(["generate", "--model", three, "--prompt", "the", "--ignore-eos", "--device", "cpu", "--generation-config", "vllm"]) == 0
    assert "\n32 tokens in" in capsys.readouterr().out

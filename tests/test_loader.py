"""Checkpoint loading: both layouts, sharded and fused-expert forms, and a clear error for every bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hylo import LLM, SamplingParams
from hylo.config import ModelError, read_model_config
from hylo.distributed import TPGroup
from hylo.kernels import select_ops
from hylo.loader import declared_parts
from hylo.models.qwen3_5 import Qwen3_5ForCausalLM
from tests.conftest import KINDS, MOE, TEXT, random_prompts


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def greedy(folder, prompt):
    llm = LLM(str(folder), device="cpu", progress=False)
    return llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids


@pytest.mark.parametrize("kind", KINDS)
def test_every_checkpoint_tensor_is_claimed_by_exactly_one_part(kind, checkpoints):
    """The declarations alone (no name table) account for every text tensor HF saves."""
    config = read_model_config(checkpoints(kind))
    claims = declared_parts(Qwen3_5ForCausalLM(config, TPGroup(), select_ops(torch.device("cpu"))))
    keys = load_file(f"{checkpoints(kind)}/model.safetensors").keys()
    text_keys = [k for k in keys if not k.startswith("model.visual.")]
    names = ["model." + k[len(config.checkpoint_prefix):] if k.startswith(config.checkpoint_prefix) else k for k in text_keys]
    assert all(n in claims for n in names), [n for n in names if n not in claims]
    assert len(set(names)) == len(names)


def test_sharded_checkpoint_with_index(checkpoints, hf_models, tmp_path):
    hf_models("dense").save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    prompt = random_prompts([9])[0]
    assert greedy(tmp_path / "sharded", prompt) == greedy(checkpoints("dense"), prompt)


def test_fused_3d_expert_tensors_load_like_per_expert_ones(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints("moe"), tmp_path / "fused")
    tensors = load_file(folder / "model.safetensors")
    experts = range(MOE["num_experts"])
    for layer in range(TEXT["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp.experts."
        gate = torch.stack([tensors.pop(f"{p}{e}.gate_proj.weight") for e in experts])
        up = torch.stack([tensors.pop(f"{p}{e}.up_proj.weight") for e in experts])
        tensors[p + "gate_up_proj"] = torch.cat([gate, up], dim=1)  # [E, 2·I, H]
        tensors[p + "down_proj"] = torch.stack([tensors.pop(f"{p}{e}.down_proj.weight") for e in experts])  # [E, H, I]
    save_file(tensors, folder / "model.safetensors")
    prompt = random_prompts([13])[0]
    assert greedy(folder, prompt) == greedy(checkpoints("moe"), prompt)


def test_missing_folder():
    with pytest.raises(ModelError, match="does not exist"):
        LLM("/nonexistent/qwen", device="cpu")


def test_unsupported_architecture_lists_supported_ones(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints("dense"), tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="LlamaForCausalLM.*not supported.*Qwen3_5ForCausalLM"):
        LLM(str(folder), device="cpu")


def test_truncated_safetensors(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints("dense"), tmp_path / "truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        LLM(str(folder), device="cpu", progress=False)


def test_missing_tensor_is_named(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints("dense"), tmp_path / "missing")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.linear_attn.in_proj_z.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelError, match=r"missing model\.layers\.1\.linear_attn\.in_proj_z\.weight"):
        LLM(str(folder), device="cpu", progress=False)


def test_unexpected_tensor_is_named(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints("dense"), tmp_path / "extra")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.linear_attn.in_proj_qkvz.weight"] = torch.zeros(4, TEXT["hidden_size"])
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelError, match="in_proj_qkvz"):
        LLM(str(folder), device="cpu", progress=False)


def test_wrong_shape_names_the_tensor(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints("dense"), tmp_path / "shape")
    tensors = load_file(folder / "model.safetensors")
    queries, hidden = TEXT["num_attention_heads"] * TEXT["head_dim"], TEXT["hidden_size"]
    tensors["model.layers.3.self_attn.q_proj.weight"] = torch.zeros(queries, hidden)  # without the gate's rows
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=rf"layers\.3\.self_attn\.q_proj\.weight.*shape \[{queries}, {hidden}\].*\[{2 * queries}, {hidden}\]"):
        LLM(str(folder), device="cpu", progress=False)


def test_prompt_errors(engines):
    llm = engines("dense", max_model_len=64)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate({"prompt_token_ids": []})
    with pytest.raises(ValueError, match="70 tokens, but max_model_len is 64"):
        llm.generate({"prompt_token_ids": [1] * 70})
    with pytest.raises(ValueError, match=rf"must be in \[0, {TEXT['vocab_size']}\)"):
        llm.generate({"prompt_token_ids": [1, 999]})
    with pytest.raises(ValueError, match="must be a string or a dict"):
        llm.generate([[1, 2, 3]])
    assert not llm.llm_engine.has_unfinished_requests()


def test_a_folder_without_tokenizer_takes_token_ids_only(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints("dense"), tmp_path / "bare")
    for f in folder.glob("tokenizer*"):
        f.unlink()
    llm = LLM(str(folder), device="cpu", progress=False)
    assert llm.generate({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].text == ""
    with pytest.raises(ValueError, match="no tokenizer.*prompt_token_ids"):
        llm.generate("text needs a tokenizer")

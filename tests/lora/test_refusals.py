"""Every adapter hylo cannot apply exactly is refused at load, naming the module and the reason; serving goes on."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hylo import AdapterError, LoRARequest, SamplingParams
from tests.conftest import EXPERT_PARAMETERS, MAX_RANK, RANK, TEXT, random_prompts

_ids = iter(range(1000, 2000))


def edited(adapter, tmp_path, config=None, tensors=None):
    """Copy an adapter folder, then update its config and/or rewrite its tensors."""
    folder = tmp_path / f"edited-{next(_ids)}"
    shutil.copytree(adapter, folder)
    if config:
        raw = json.loads((folder / "adapter_config.json").read_text())
        raw.update(config)
        (folder / "adapter_config.json").write_text(json.dumps(raw))
    if tensors:
        weights = load_file(folder / "adapter_model.safetensors")
        tensors(weights)
        save_file(weights, folder / "adapter_model.safetensors")
    return str(folder)


def refused(llm, folder, match):
    with pytest.raises(AdapterError, match=match):
        llm.add_lora(LoRARequest("bad", next(_ids), folder))


@pytest.fixture
def llm(engines):
    return engines("dense", enable_lora=True, max_loras=2, max_lora_rank=MAX_RANK)


@pytest.fixture
def good(adapters):
    return adapters("dense", seed=60)


def test_dora(llm, good, tmp_path):
    refused(llm, edited(good, tmp_path, {"use_dora": True}), "DoRA")


def test_modules_to_save(llm, good, tmp_path):
    refused(llm, edited(good, tmp_path, {"modules_to_save": ["lm_head"]}), "modules_to_save")


def test_rank_above_max(llm, adapters):
    r = MAX_RANK + 1
    refused(llm, adapters("dense", seed=61, r=r), rf"rank {r} is above max_lora_rank={MAX_RANK}.*max_lora_rank >= {r}")


def test_adapter_for_another_model(llm, tmp_path, good):
    def widen(w):
        key = "base_model.model.model.layers.0.linear_attn.in_proj_z.lora_A.weight"
        w[key] = torch.randn(RANK, 2 * TEXT["hidden_size"])
    match = rf"in_proj_z.*shapes A \[{RANK}, {2 * TEXT['hidden_size']}\].*expects A \[r, {TEXT['hidden_size']}\]"
    refused(llm, edited(good, tmp_path, tensors=widen), match)


@pytest.mark.parametrize(
    "targets, match",
    [(["conv1d"], "conv1d"), (["embed_tokens"], "embeddings"), (["lm_head"], "lm_head"), (["qkv"], "does not have")],
)
def test_targets_hylo_does_not_apply(llm, good, tmp_path, targets, match):
    refused(llm, edited(good, tmp_path, {"target_modules": targets + ["q_proj"]}), match)


def test_conv1d_tensors_are_refused(llm, good, tmp_path):
    def add_conv(w):
        w["base_model.model.model.layers.0.linear_attn.conv1d.lora_A.weight"] = torch.randn(4, 1, 4)
        w["base_model.model.model.layers.0.linear_attn.conv1d.lora_B.weight"] = torch.randn(128, 4, 1)
    folder = edited(good, tmp_path, {"target_modules": ["conv1d", "in_proj_z"]}, add_conv)
    refused(llm, folder, r"layers\.0\.linear_attn\.conv1d: hylo does not apply LoRA to the GDN conv1d")


def test_vision_tower_tensors(engines, tmp_path, adapters):
    llm = engines("dense-vl", enable_lora=True, max_loras=2, max_lora_rank=MAX_RANK)
    def add_vision(w):
        w["base_model.model.model.visual.blocks.0.attn.qkv.lora_A.weight"] = torch.randn(4, 16)
        w["base_model.model.model.visual.blocks.0.attn.qkv.lora_B.weight"] = torch.randn(48, 4)
    refused(llm, edited(adapters("dense-vl", seed=63), tmp_path, tensors=add_vision), "vision tower")


def test_an_extra_unknown_tensor_is_named(llm, good, tmp_path):
    def extra(w):
        w["base_model.model.model.layers.0.linear_attn.in_proj_qkvz.lora_A.weight"] = torch.randn(4, 32)
        w["base_model.model.model.layers.0.linear_attn.mystery.lora_B.weight"] = torch.randn(4, 4)
    refused(llm, edited(good, tmp_path, tensors=extra), r"mystery")


def test_a_tensor_the_config_does_not_target(llm, good, tmp_path):
    refused(llm, edited(good, tmp_path, {"target_modules": ["q_proj", "k_proj"]}), r"target_modules does not cover it")


def test_a_linear_targeted_through_target_parameters(engines, adapters):
    """PEFT wraps a 2D linear's weight named in target_parameters and loads the adapter; hylo reads target_parameters
    for the fused experts only, and says so (not that PEFT would ignore the tensors)."""
    llm = engines("moe", enable_lora=True, max_loras=2, max_lora_rank=MAX_RANK)
    adapter = adapters("moe", seed=67, target_modules=None, target_parameters=["shared_expert_gate.weight"])
    refused(llm, adapter, r"layers\.0\.mlp\.shared_expert_gate' is targeted through target_parameters.*retrain with this module in target_modules")


def test_a_targeted_module_without_tensors(llm, good, tmp_path):
    def drop(w):
        for key in [k for k in w if ".layers.2.linear_attn.in_proj_b." in k]:
            del w[key]
    refused(llm, edited(good, tmp_path, tensors=drop), r"layers\.2\.linear_attn\.in_proj_b: adapter_config\.json targets this module")


def test_rank_disagreeing_with_config(llm, good, tmp_path):
    refused(llm, edited(good, tmp_path, {"r": RANK + 2}), f"gives rank {RANK + 2} for this module but its tensors have rank {RANK}")


@pytest.mark.parametrize(
    "kind, key, value",
    [
        ("dense", "layers.1.linear_attn.in_proj_z.lora_B.weight", float("nan")),
        ("dense", "layers.3.self_attn.q_proj.lora_A.weight", float("inf")),
        ("moe", "layers.2.mlp.experts.lora_B.weight", float("-inf")),  # PEFT's target_parameters (down_proj)
    ],
    ids=["nan", "inf", "expert-minus-inf"],
)
def test_non_finite_weights(kind, key, value, engines, adapters, tmp_path):
    """One NaN or ±inf value would make every output of a request using the adapter NaN: refused at load."""
    lora = dict(target_modules=None, target_parameters=EXPERT_PARAMETERS) if kind == "moe" else {}
    def poison(w):
        w["base_model.model.model." + key][1, 2] = value
    folder = edited(adapters(kind, seed=65, **lora), tmp_path, tensors=poison)
    module = re.escape(key.rpartition(".lora_")[0])
    matrix = key.split(".")[-2]
    refused(engines(kind, enable_lora=True, max_loras=2, max_lora_rank=MAX_RANK), folder,
            rf"adapter 'bad' .* is refused:\n  base_model\.model\.model\.{module}: {matrix} holds NaN or infinite values")


def test_missing_and_corrupt_files(llm, good, tmp_path):
    refused(llm, str(tmp_path / "nowhere"), "does not exist")
    no_config = edited(good, tmp_path)
    (tmp_path / no_config.rpartition("/")[2] / "adapter_config.json").unlink()
    refused(llm, no_config, "no adapter_config.json")
    corrupt = edited(good, tmp_path)
    path = tmp_path / corrupt.rpartition("/")[2] / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    refused(llm, corrupt, "unreadable or corrupt")


def test_fused_qkvz_names_are_refused_when_the_row_order_is_ambiguous(llm, good, tmp_path):
    def fuse(w):
        p = "base_model.model.model.layers.0.linear_attn."
        w[p + "in_proj_qkvz.lora_A.weight"] = w.pop(p + "in_proj_qkv.lora_A.weight")
        w[p + "in_proj_qkvz.lora_B.weight"] = torch.cat([w.pop(p + "in_proj_qkv.lora_B.weight"), w.pop(p + "in_proj_z.lora_B.weight")])
        del w[p + "in_proj_z.lora_A.weight"]
    refused(llm, edited(good, tmp_path, tensors=fuse), rf"in_proj_qkvz' rows may be ordered flat or grouped per key head; with {TEXT['linear_num_key_heads']} key heads")


def test_serving_goes_on_after_a_refusal(llm, good, tmp_path):
    prompt = random_prompts([5], seed=64)[0]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    request = LoRARequest("fine", next(_ids), good)
    before = llm.generate({"prompt_token_ids": prompt}, params, lora_request=request)[0].outputs[0].token_ids
    with pytest.raises(AdapterError):
        llm.generate({"prompt_token_ids": prompt}, params, lora_request=LoRARequest("bad", next(_ids), edited(good, tmp_path, {"use_dora": True})))
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.generate({"prompt_token_ids": prompt}, params, lora_request=request)[0].outputs[0].token_ids == before


def test_a_refused_adapter_among_several_read_side_by_side_stops_the_call_before_anything_runs(llm, good, adapters, tmp_path):
    """generate() reads its adapters at once: the refused one raises naming its reason, nothing runs, and the good
    ones read beside it serve the next call."""
    other = LoRARequest("other", next(_ids), adapters("dense", seed=62))
    bad = LoRARequest("bad", next(_ids), edited(good, tmp_path, {"use_dora": True}))
    prompts = [{"prompt_token_ids": [3, 4, 5]}] * 2
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with pytest.raises(AdapterError, match="DoRA"):
        llm.generate(prompts, params, lora_request=[other, bad])
    assert not llm.llm_engine.has_unfinished_requests()
    assert len(llm.generate(prompts[:1], params, lora_request=other)[0].outputs[0].token_ids) == 4

"""The layer declarations alone account for every adapter name: no second table, nothing unclaimed."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hylo import LoRARequest, SamplingParams
from hylo.config import read_model_config
from hylo.distributed import TPGroup
from hylo.kernels import select_ops
from hylo.lora.adapter import lora_targets, untargetable
from hylo.models.qwen3_5 import Qwen3_5ForCausalLM
from tests.conftest import KINDS, MAX_RANK, RANK, build_hf_model, hf_peft_greedy, random_prompts


@pytest.mark.parametrize("kind", KINDS)
def test_every_peft_linear_target_maps_to_exactly_one_part(kind, checkpoints):
    """Every nn.Linear of the reference text model is a LoRA target of one part, or refused with a reason."""
    config = read_model_config(checkpoints(kind))
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(config, TPGroup(), select_ops(torch.device("cpu")))
    targets, refused = lora_targets(model), untargetable(model)
    prefix = config.checkpoint_prefix
    reference = build_hf_model(kind)
    linears = [n for n, m in reference.named_modules() if isinstance(m, nn.Linear) and not n.startswith("model.visual")]
    for name in linears:
        ours = "model." + name[len(prefix):] if name.startswith(prefix) else name
        claimed = [t for t in targets.values() if t.name == ours]
        assert len(claimed) == 1 or ours in refused, f"{name} is neither a LoRA target nor refused with a reason"
    # And PEFT's target_parameters of the fused experts land on declared parts.
    for name, p in reference.named_parameters():
        if re.search(r"mlp\.experts\.(gate_up_proj|down_proj)$", name):
            ours = "model." + name[len(prefix):]
            assert targets[ours].part.lora == "parameter"


def test_fused_qkvz_and_ba_adapters_split_when_unambiguous(tmp_path):
    """With one key head the flat and per-head-grouped row orders coincide, so in_proj_qkvz / in_proj_ba
    adapters are split into their declared parts and must equal HF+PEFT on the split form."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from hylo import LLM
    from tests.conftest import TEXT, DENSE

    torch.manual_seed(5)
    text = tf.Qwen3_5TextConfig(**{**TEXT, "linear_num_key_heads": 1, "linear_num_value_heads": 2}, **DENSE)
    base = tf.Qwen3_5ForCausalLM(text).eval()
    base.save_pretrained(tmp_path / "base")
    peft = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=8, init_lora_weights=False, target_modules=["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"]))
    tensors = {k: v * 4 if "lora_B" in k else v for k, v in peft.state_dict().items() if "lora_" in k}
    tensors = {k.replace(".default", ""): v.contiguous() for k, v in tensors.items()}
    fused = {}
    for layer in range(3):
        p = f"base_model.model.model.layers.{layer}.linear_attn."
        for whole, (first, second) in (("in_proj_qkvz", ("in_proj_qkv", "in_proj_z")), ("in_proj_ba", ("in_proj_b", "in_proj_a"))):
            tensors[p + second + ".lora_A.weight"] = tensors[p + first + ".lora_A.weight"].clone()  # a fused layer has one A
            fused[p + whole + ".lora_A.weight"] = tensors[p + first + ".lora_A.weight"]
            fused[p + whole + ".lora_B.weight"] = torch.cat([tensors[p + first + ".lora_B.weight"], tensors[p + second + ".lora_B.weight"]])
    peft.save_pretrained(tmp_path / "split")
    save_file(tensors, tmp_path / "split" / "adapter_model.safetensors")
    shutil.copytree(tmp_path / "split", tmp_path / "fused")
    save_file(fused, tmp_path / "fused" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "fused" / "adapter_config.json").read_text())
    config["target_modules"] = ["in_proj_qkvz", "in_proj_ba"]
    (tmp_path / "fused" / "adapter_config.json").write_text(json.dumps(config))

    llm = LLM(str(tmp_path / "base"), device="cpu", progress=False, enable_lora=True, max_lora_rank=MAX_RANK)
    prompt = random_prompts([8], seed=72)[0]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), lora_request=LoRARequest("f", 1, str(tmp_path / "fused")))
    ref = hf_peft_greedy("dense", str(tmp_path / "base"), str(tmp_path / "split"), prompt, 10)[0]
    assert out[0].outputs[0].token_ids == ref

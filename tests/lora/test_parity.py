"""Adapters give HF+PEFT's output: every target alone and all together, every kind and layout, PEFT's scaling variants."""

import itertools

import pytest

from hylo import LoRARequest, SamplingParams
from tests.conftest import DENSE_TARGETS, EXPERT_PARAMETERS, MAX_RANK, hf_peft_greedy, random_prompts

STEPS = 12
_ids = itertools.count(1)


def check_against_peft(kind, checkpoints, engines, adapter, prompts=None):
    llm = engines(kind, enable_lora=True, max_loras=2, max_lora_rank=MAX_RANK)
    prompts = prompts or random_prompts([5, 21], seed=31)
    request = LoRARequest(f"a{next(_ids)}", next(_ids), adapter)
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=request)
    base = llm.generate({"prompt_token_ids": prompts[0]}, params)[0].outputs[0].token_ids
    for prompt, out in zip(prompts, outs):
        ref_tokens, ref_logits = hf_peft_greedy(kind, checkpoints(kind), adapter, prompt, STEPS)
        assert out.outputs[0].token_ids == ref_tokens
        ref_logprobs = ref_logits.log_softmax(-1)
        for step, entry in enumerate(out.outputs[0].logprobs):
            for token, lp in entry.items():
                assert lp.logprob == pytest.approx(ref_logprobs[step, token].item(), abs=2e-4)
    assert outs[0].outputs[0].token_ids != base, "the adapter must change the output for the test to mean anything"


@pytest.mark.parametrize("target", DENSE_TARGETS)
def test_each_dense_target_alone(target, checkpoints, engines, adapters):
    check_against_peft("dense", checkpoints, engines, adapters("dense", seed=1, target_modules=[target]))


@pytest.mark.parametrize(
    "lora",
    [
        dict(target_modules=["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"]),
        dict(target_modules=["shared_expert_gate"]),
        dict(target_modules=None, target_parameters=["mlp.experts.gate_up_proj"]),
        dict(target_modules=None, target_parameters=["mlp.experts.down_proj"]),
        dict(target_modules=None, target_parameters=EXPERT_PARAMETERS),
    ],
    ids=["shared-expert", "shared-expert-gate", "experts-gate-up", "experts-down", "experts-both"],
)
def test_each_moe_target_alone(lora, checkpoints, engines, adapters):
    check_against_peft("moe", checkpoints, engines, adapters("moe", seed=2, **lora))


@pytest.mark.parametrize("kind", ["dense", "moe", "dense-vl", "moe-vl"])
def test_all_targets_together(kind, checkpoints, engines, adapters):
    check_against_peft(kind, checkpoints, engines, adapters(kind, seed=3))


@pytest.mark.parametrize(
    "variant",
    [
        dict(lora_alpha=3),
        dict(use_rslora=True, r=9, lora_alpha=5),
        dict(rank_pattern={"in_proj_z": 6, "layers.3.self_attn.q_proj": 7}, alpha_pattern={"out_proj": 20}),
        dict(layers_to_transform=[0, 3]),
        dict(target_modules=r".*\.(in_proj_b|o_proj|down_proj)"),
        dict(r=1),
    ],
    ids=["alpha", "rslora", "rank-alpha-pattern", "layers-to-transform", "regex", "rank-1"],
)
def test_scaling_variants(variant, checkpoints, engines, adapters):
    check_against_peft("dense", checkpoints, engines, adapters("dense", seed=4, **variant))


def test_moe_variants(checkpoints, engines, adapters):
    adapter = adapters("moe", seed=5, rank_pattern={"mlp.experts.down_proj": 7}, alpha_pattern={"gate_up_proj": 3}, use_rslora=True)
    check_against_peft("moe", checkpoints, engines, adapter)

"""This session's engine features on a CUDA device, decode graphs on (marked `gpu`, skipped elsewhere): prefix
caching, prompt logprobs, structured outputs and logit controls give what the CPU float32 engine gives."""

import json

import pytest
import torch

from hylo import LLM, LoRARequest, SamplingParams, StructuredOutputsParams
from tests.conftest import MAX_RANK, random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CACHE = 1 << 28  # several engines share the GPU in one test process


def cuda_engine(checkpoints, kind: str = "dense", **options) -> LLM:
    return LLM(checkpoints(kind), device="cuda", dtype="float32", progress=False, kv_cache_memory_bytes=CACHE, **options)


def token_ids(llm, prompts, params, loras=None) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=loras)]


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_prefix_caching_on_cuda_gives_the_uncached_tokens(kind, checkpoints, adapters, engines):
    """Shared prefixes of several blocks under two adapters and none, the second round resuming from the cache
    (KV blocks and GDN snapshots restored on the device), decode steps replaying graphs."""
    shared = random_prompts([70], seed=300)[0]
    prompts = [shared + tail for tail in random_prompts([3, 9, 17], seed=301)] + [shared]
    loras = [LoRARequest("p1", 31, adapters(kind, seed=302)), None, LoRARequest("p2", 32, adapters(kind, seed=303)), None]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    options = dict(enable_lora=True, max_loras=2, max_lora_rank=MAX_RANK)
    cached = cuda_engine(checkpoints, kind, enable_prefix_caching=True, **options)
    try:
        first = token_ids(cached, prompts, params, loras)
        hits = cached.llm_engine.scheduler.prefix.hits
        second = token_ids(cached, prompts, params, loras)
        assert cached.llm_engine.scheduler.prefix.hits - hits >= 4 * 64  # every prompt resumed past its shared blocks
        assert cached.llm_engine.executor.driver.graphs is not None
    finally:
        cached.shutdown()
    plain = cuda_engine(checkpoints, kind, **options)
    try:
        assert first == second == token_ids(plain, prompts, params, loras)
    finally:
        plain.shutdown()


def test_prompt_logprobs_on_cuda_equal_the_cpu_engine(checkpoints, engines):
    prompts = random_prompts([6, 23], seed=310)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=2)
    llm = cuda_engine(checkpoints)
    try:
        gpu = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    finally:
        llm.shutdown()
    cpu = engines("dense").generate([{"prompt_token_ids": p} for p in prompts], params)
    for a, b in zip(gpu, cpu):
        assert a.prompt_logprobs[0] is None and b.prompt_logprobs[0] is None
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            # fla's chunked prefill multiplies float32 in TF32 on the GPU: ~1e-3 apart from the CPU's float32, as the TP tests allow.
            assert {t: lp.logprob for t, lp in x.items()} == pytest.approx({t: lp.logprob for t, lp in y.items()}, abs=5e-3)


def test_structured_outputs_and_logit_controls_on_cuda(checkpoints):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    allowed = [5, 17, 40, 41]
    batch = [
        SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=schema)),
        SamplingParams(temperature=1.0, seed=3, max_tokens=60, structured_outputs=StructuredOutputsParams(choice=["yes", "no"])),
        SamplingParams(temperature=1.0, seed=4, max_tokens=10, ignore_eos=True, allowed_token_ids=allowed),
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
    ]
    llm = cuda_engine(checkpoints)
    try:
        outs = [llm.generate("count: 1 2 3", p)[0].outputs[0] for p in batch[3:]]  # the free row alone, for its greedy tokens
        together = llm.generate(["count: 1 2 3"] * 4, batch)
    finally:
        llm.shutdown()
    parsed = json.loads(together[0].outputs[0].text)
    assert set(parsed) == {"n", "ok"} and isinstance(parsed["ok"], bool)
    assert together[1].outputs[0].text in ("yes", "no")
    assert set(together[2].outputs[0].token_ids) <= set(allowed)
    assert together[3].outputs[0].token_ids == outs[0].token_ids  # constraints elsewhere in the batch change nothing here

"""prompt_logprobs equal HF transformers' (+ PEFT's) log_softmax of the prompt logits: whole prefills, chunked
prefills, adapters, n > 1, and tensor parallelism."""

import pytest
import torch

from hylo import LLM, LoRARequest, SamplingParams
from hylo.engine import prompt_logprobs
from hylo.sampling import InvalidParam
from tests.conftest import random_prompts

K = 3


def hf_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row p is the log-distribution of prompt token p + 1."""
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)


def hf_peft(kind: str, checkpoint: str, adapter: str | None):
    import transformers as tf
    from peft import PeftModel

    model = tf.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(model, adapter).eval() if adapter else model


def assert_matches(prompt_logprobs, prompt: list[int], reference: torch.Tensor, k: int = K) -> None:
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for p, entry in enumerate(prompt_logprobs[1:]):
        target, row = prompt[p + 1], reference[p]
        first = next(iter(entry))
        assert first == target, "the prompt token comes first in its entry"
        assert entry[target].logprob == pytest.approx(row[target].item(), abs=2e-4)
        assert entry[target].rank == int((row > row[target]).sum()) + 1
        top = row.topk(k)
        for rank, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
            if t != target:
                assert entry[t].rank == rank + 1 and entry[t].logprob == pytest.approx(v, abs=2e-4)
        assert set(entry) <= {target, *top.indices.tolist()}


@pytest.mark.parametrize("chunk", [2048, 5])
def test_prompt_logprobs_equal_hf(engines, hf_models, chunk, monkeypatch):
    """chunk 5: prompts of 13 and 22 tokens prefill over several steps, with the logprobs gathered chunk by chunk;
    a whole prefill's rows are turned into logprobs 4 at a time."""
    monkeypatch.setattr(prompt_logprobs, "ROWS_AT_ONCE", 4)
    llm = engines("dense", max_num_batched_tokens=chunk)
    prompts = random_prompts([13, 22, 1], seed=7)
    params = [SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=K), SamplingParams(temperature=0, max_tokens=3),
              SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0)]
    outs = llm.generate([{"prompt_token_ids": prompts[0]}, {"prompt_token_ids": prompts[1]}, {"prompt_token_ids": prompts[2]}], params)
    assert_matches(outs[0].prompt_logprobs, prompts[0], hf_prompt_logprobs(hf_models("dense"), prompts[0]))
    assert outs[1].prompt_logprobs is None, "only requests that ask pay for it"
    assert outs[2].prompt_logprobs == [None]  # one prompt token: nothing predicts it
    again = llm.generate({"prompt_token_ids": prompts[1]}, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=0))[0]
    assert_matches(again.prompt_logprobs, prompts[1], hf_prompt_logprobs(hf_models("dense"), prompts[1]), k=0)
    assert [len(e) for e in again.prompt_logprobs[1:]] == [1] * 21, "prompt_logprobs=0: the prompt token alone"
    assert again.outputs[0].token_ids == outs[1].outputs[0].token_ids, "asking for prompt logprobs changes no output"


def test_prompt_logprobs_with_adapters_and_n(checkpoints, adapters):
    folder = adapters("dense", seed=31)
    llm = LLM(checkpoints("dense"), device="cpu", progress=False, enable_lora=True, max_lora_rank=8, max_num_batched_tokens=7)
    try:
        prompts = random_prompts([11, 9], seed=8)
        params = SamplingParams(temperature=0.8, n=3, max_tokens=2, prompt_logprobs=K, seed=1)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=[LoRARequest("a", 1, folder), None])
    finally:
        llm.shutdown()
    assert_matches(outs[0].prompt_logprobs, prompts[0], hf_prompt_logprobs(hf_peft("dense", checkpoints("dense"), folder), prompts[0]))
    assert_matches(outs[1].prompt_logprobs, prompts[1], hf_prompt_logprobs(hf_peft("dense", checkpoints("dense"), None), prompts[1]))


def test_prompt_logprobs_at_tp2(checkpoints, hf_models):
    llm = LLM(checkpoints("moe"), device="cpu", progress=False, tensor_parallel_size=2, max_num_batched_tokens=6)
    try:
        prompt = random_prompts([15], seed=9)[0]
        out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=K))[0]
    finally:
        llm.shutdown()
    assert_matches(out.prompt_logprobs, prompt, hf_prompt_logprobs(hf_models("moe"), prompt))


def test_prompt_logprobs_are_bounded_by_max_logprobs(engines):
    llm = engines("dense")
    with pytest.raises(InvalidParam, match="prompt_logprobs=21 is above this engine's max_logprobs=20") as e:
        llm.generate("the", SamplingParams(prompt_logprobs=21))
    assert e.value.param == "prompt_logprobs"
    with pytest.raises(InvalidParam, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)


def test_prompt_logprobs_survive_preemption(checkpoints, engines, hf_models):
    """Sequences preempted and recomputed do not record their prompt positions twice."""
    ref = engines("dense")
    shapes, dtype = ref.llm_engine.model.cache_shapes(), ref.llm_engine.dtype
    slot, block = shapes.slot_bytes(dtype), shapes.block_bytes(16, dtype)
    small = LLM(checkpoints("dense"), device="cpu", progress=False, kv_cache_memory_bytes=slot + block + 12 * slot,
                max_model_len=128, max_num_seqs=6, max_num_batched_tokens=16)
    try:
        prompts = random_prompts([40, 33, 25, 47, 30, 38], seed=12)
        outs = small.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=1))
        assert small.llm_engine.scheduler.num_preemptions > 0
    finally:
        small.shutdown()
    for prompt, out in zip(prompts, outs):
        assert_matches(out.prompt_logprobs, prompt, hf_prompt_logprobs(hf_models("dense"), prompt), k=1)


def test_a_step_adds_at_most_max_num_seqs_rows_of_prompt_logits(engines, hf_models, monkeypatch):
    """The device keeps room for about max_num_seqs rows of logits: longer prompts that ask for prompt logprobs
    prefill in chunks of that many rows per step, and their logprobs are still HF's."""
    from hylo.engine import engine as engine_module

    rows = []
    prepare = engine_module.prepare_step
    monkeypatch.setattr(engine_module, "prepare_step", lambda *a: rows.append(len((step := prepare(*a)).logits_indices)) or step)
    llm = engines("dense", max_num_seqs=4)
    prompts = random_prompts([30, 19], seed=8)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1))
    assert max(rows) <= 4 + 2, "prompt rows within max_num_seqs, besides one sampled row per sequence"
    for out, prompt in zip(outs, prompts):
        assert_matches(out.prompt_logprobs, prompt, hf_prompt_logprobs(hf_models("dense"), prompt), k=1)

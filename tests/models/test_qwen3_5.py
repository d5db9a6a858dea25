"""The model against HF transformers: greedy tokens and logits, every kind and layout, prompts batched together."""

import pytest
import torch

from hylo import SamplingParams
from tests.conftest import KINDS, hf_greedy, random_prompts

STEPS = 16


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_and_logprobs_match_hf(kind, engines, hf_models):
    llm, hf = engines(kind), hf_models(kind)
    prompts = random_prompts([1, 7, 23, 70], seed=3)
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, out in zip(prompts, outs):
        ref_tokens, ref_logits = hf_greedy(hf, prompt, STEPS)
        got = out.outputs[0]
        assert got.token_ids == ref_tokens
        ref_logprobs = ref_logits.log_softmax(-1)
        for step, entry in enumerate(got.logprobs):
            for token, lp in entry.items():
                assert lp.logprob == pytest.approx(ref_logprobs[step, token].item(), abs=1e-4)


def test_tied_embeddings_match_hf(checkpoints, engines):
    from tests.conftest import build_hf_model

    hf = build_hf_model("dense", tie=True)
    llm = engines("dense-tied")
    prompt = random_prompts([12], seed=5)[0]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(hf, prompt, STEPS)[0]


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_prefill_logits_at_every_position_match_hf(kind, engines, hf_models):
    """Logits for every prompt position (not only the last), through the runner's own batch."""
    from hylo.engine.runner import prepare_step
    from hylo.engine.scheduler import Scheduled
    from hylo.engine.sequence import Request, Sequence

    engine = engines(kind).llm_engine
    prompt = random_prompts([40], seed=9)[0]
    seq = Sequence(10_000, Request("logits", None, prompt, SamplingParams(), []), 0, None)
    seq.block_ids = engine.scheduler.blocks.take(3)
    seq.state_slot = engine.scheduler.slots.take(1)[0]
    try:
        step = prepare_step([Scheduled(seq, len(prompt))], engine.config.block_size)
        step.logits_indices = list(range(len(prompt)))
        logits = engine.executor.call("execute", step)[0]
    finally:
        engine.scheduler.blocks.give(seq.block_ids)
        engine.scheduler.slots.give([seq.state_slot])
    with torch.no_grad():
        ref = hf_models(kind)(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(logits, ref, atol=2e-5, rtol=1e-4)

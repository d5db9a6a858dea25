"""Sampling through the engine: seeds, stops, penalties, n > 1 and logprobs."""

import pytest
import torch

from hylo import SamplingParams
from hylo.sampling import SampleInput, sample
from tests.conftest import random_prompts


def tokens(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(engines):
    llm = engines("dense")
    prompt = random_prompts([9], seed=21)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=20, seed=7, ignore_eos=True)
    alone = tokens(llm, [prompt], seeded)[0]
    assert tokens(llm, [prompt], seeded)[0] == alone
    others = random_prompts([4, 30, 12], seed=22)
    mixed = llm.generate(
        [{"prompt_token_ids": p} for p in [others[0], prompt, others[1], others[2]]],
        [SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True)] * 1 + [seeded] + [SamplingParams(temperature=0.5, max_tokens=5)] * 2,
    )
    assert mixed[1].outputs[0].token_ids == alone
    assert tokens(llm, [prompt], SamplingParams(temperature=1.0, top_p=0.95, max_tokens=20, seed=8, ignore_eos=True))[0] != alone


def test_n_sequences_differ_and_are_each_reproducible(engines):
    llm = engines("dense")
    params = SamplingParams(n=3, temperature=1.0, max_tokens=15, seed=3, ignore_eos=True)
    a = llm.generate({"prompt_token_ids": [5, 6, 7]}, params)[0]
    b = llm.generate({"prompt_token_ids": [5, 6, 7]}, params)[0]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) == 3


def test_stop_token_ids_and_eos(engines):
    llm = engines("dense")
    prompt = random_prompts([6], seed=23)[0]
    free = tokens(llm, [prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    stop_at = free[4]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at], ignore_eos=True))[0].outputs[0]
    assert out.token_ids == free[: free.index(stop_at) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_at)
    # The checkpoint's eos (id 0) ends generation unless ignore_eos; min_tokens holds it back.
    eos_free = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at], min_tokens=8, ignore_eos=True))[0].outputs[0]
    assert stop_at not in eos_free.token_ids[:8]


def test_top_k_1_is_greedy_and_min_p_1_is_greedy(engines):
    llm = engines("moe")
    prompts = random_prompts([8, 15], seed=24)
    greedy = tokens(llm, prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert tokens(llm, prompts, SamplingParams(temperature=1.5, top_k=1, max_tokens=10, ignore_eos=True)) == greedy
    assert tokens(llm, prompts, SamplingParams(temperature=1.5, min_p=1.0, max_tokens=10, ignore_eos=True)) == greedy


def test_presence_penalty_prevents_repeats(engines):
    llm = engines("dense")
    prompt = random_prompts([5], seed=25)[0]
    out = tokens(llm, [prompt], SamplingParams(temperature=0, presence_penalty=2.0, max_tokens=30, ignore_eos=True))[0]
    plain = tokens(llm, [prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    assert len(set(plain)) < len(plain), "the tiny model repeats itself without a penalty"
    # logits of random tiny models span less than 2, so a 2.0 penalty bans every seen token.
    assert len(set(out)) == len(out)


def test_repetition_penalty_matches_hf_processor():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(2, 50)
    inputs = [SampleInput(SamplingParams(temperature=0, repetition_penalty=1.7), [3, 4], [9, 3], 0),
              SampleInput(SamplingParams(temperature=0, repetition_penalty=1.3), [1], [], 0)]
    got = sample(logits, inputs).token_ids
    ref = [RepetitionPenaltyLogitsProcessor(p)(torch.tensor([ids]), logits[i : i + 1].clone()).argmax().item()
           for i, (p, ids) in enumerate([(1.7, [3, 4, 9, 3]), (1.3, [1])])]
    assert got == ref


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = set()
    for seed in range(200):
        seen |= set(sample(logits, [SampleInput(SamplingParams(top_p=0.75, seed=seed), [1], [], 0)]).token_ids)
    assert seen == {0, 1}


def test_logprobs_are_the_raw_model_distribution(engines):
    llm = engines("dense")
    out = llm.generate({"prompt_token_ids": [3, 4]}, SamplingParams(temperature=0.8, seed=1, max_tokens=5, logprobs=4, ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 5
    total = 0.0
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and len(entry) in (4, 5)
        ranks = sorted(lp.rank for t, lp in entry.items() if t != token or lp.rank <= 4)
        assert ranks[:4] == [1, 2, 3, 4]
        total += entry[token].logprob
    assert out.cumulative_logprob == pytest.approx(total)


@pytest.mark.parametrize(
    "field, value",
    [("max_tokens", 0), ("max_tokens", -3), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
     ("min_p", 2.0), ("n", 0), ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("logprobs", -1), ("stop", [""])],
)
def test_invalid_sampling_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}="):
        SamplingParams(**{field: value})

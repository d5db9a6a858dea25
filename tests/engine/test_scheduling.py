"""Continuous batching, preemption and chunked prefill give every request the tokens it gets alone."""

import pytest

from hylo import LLM, SamplingParams
from tests.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def alone(llm, prompts, params=GREEDY):
    return [llm.generate({"prompt_token_ids": p}, params)[0].outputs[0].token_ids for p in prompts]


def run_staggered(engine, prompts, arrivals, params):
    """Add prompt i at step arrivals[i]; run to completion; token ids per prompt."""
    done, step = {}, 0
    while len(done) < len(prompts):
        for i, at in enumerate(arrivals):
            if at == step:
                engine.add_request(f"r{i}", {"prompt_token_ids": prompts[i]}, params[i])
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        step += 1
    return [done[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_requests_joining_mid_run_and_finishing_at_different_times(kind, engines):
    llm = engines(kind)
    prompts = random_prompts([5, 30, 11, 2, 19], seed=11)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 4, 9, 15, 6)]
    expected = [alone(llm, [p], sp)[0] for p, sp in zip(prompts, params)]
    got = run_staggered(llm.llm_engine, prompts, [0, 0, 3, 5, 9], params)
    assert got == expected
    assert not llm.llm_engine.scheduler.running and not llm.llm_engine.scheduler.waiting


def test_preemption_under_a_small_kv_budget_keeps_tokens(checkpoints, engines):
    ref = engines("dense")
    prompts = random_prompts([40, 33, 25, 47, 30, 38], seed=12)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = alone(ref, prompts, params)
    # Six GDN slots (half the budget) and KV blocks from the rest: fewer than the six sequences need at once.
    shapes, dtype = ref.llm_engine.model.cache_shapes(), ref.llm_engine.dtype
    slot, block = shapes.slot_bytes(dtype), shapes.block_bytes(16, dtype)
    small = LLM(checkpoints("dense"), device="cpu", progress=False, kv_cache_memory_bytes=slot + block + 12 * slot,
                max_model_len=128, max_num_seqs=6)
    scheduler = small.llm_engine.scheduler
    needed = sum(-(-(len(p) + 40) // 16) for p in prompts)
    assert scheduler.slots.size == 6 and 128 // 16 <= scheduler.blocks.size < needed
    outs = small.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert scheduler.num_preemptions > 0
    assert scheduler.blocks.num_free == scheduler.blocks.size
    assert scheduler.slots.num_free == scheduler.slots.size


@pytest.mark.parametrize("budget", [7, 16])
def test_chunked_prefill_equals_unchunked(budget, checkpoints, engines):
    prompts = random_prompts([100, 45, 3], seed=13)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    whole = engines("moe").generate([{"prompt_token_ids": p} for p in prompts], params)
    chunked = LLM(checkpoints("moe"), device="cpu", progress=False, max_num_batched_tokens=budget)
    parts = chunked.generate([{"prompt_token_ids": p} for p in prompts], params)
    for a, b in zip(whole, parts):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for token, lp in la.items():
                assert lb[token].logprob == pytest.approx(lp.logprob, abs=1e-4)


def test_abort_returns_blocks_and_slot_at_once(engines):
    engine = engines("dense").llm_engine
    scheduler = engine.scheduler
    engine.add_request("gone", {"prompt_token_ids": random_prompts([50])[0]}, SamplingParams(max_tokens=100))
    engine.step()
    assert scheduler.blocks.num_free < scheduler.blocks.size
    engine.abort_request("gone")
    assert scheduler.blocks.num_free == scheduler.blocks.size
    assert scheduler.slots.num_free == scheduler.slots.size
    assert not engine.has_unfinished_requests()

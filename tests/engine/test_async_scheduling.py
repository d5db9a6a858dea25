"""Async scheduling: the next step is launched before the host reads the last step's tokens (they reach the next
step's inputs on the device). Every request must get exactly what it gets with the tokens read at once: stops,
lengths, aborts, preemption and rows whose sampling needs the output so far included."""

import pytest
import torch

from hylo import SamplingParams
from hylo.engine.scheduler import PendingPreemption
from tests.conftest import random_prompts

PROMPTS = random_prompts([5, 17, 9, 3, 12, 8], seed=31)


def run(engine, prompts, params, abort_at: dict[int, str] | None = None):
    """Every prompt at once; `abort_at`: step → request id aborted before it. Request id → (its last output, the step
    that gave it)."""
    last, step = {}, 0
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, sp)
    while engine.has_unfinished_requests():
        if abort_at and step in abort_at:
            engine.abort_request(abort_at[step])
        for out in engine.step():
            last[out.request_id] = (out, step)
        step += 1
    return {k: out for k, (out, _) in last.items()} if not abort_at else last


def summary(out):
    return [(c.token_ids, c.finish_reason, c.stop_reason, c.logprobs and [sorted(lp) for lp in c.logprobs]) for c in out.outputs]


ELIGIBLE = [
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    None,  # stops early on a token that does come (set below)
    SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.5),  # reads the output so far
    SamplingParams(temperature=0.8, top_p=0.9, max_tokens=7, ignore_eos=True),  # the engine's generator
    SamplingParams(temperature=0.7, seed=5, max_tokens=9, n=2, ignore_eos=True),  # seeded by position
]


@pytest.mark.parametrize("synchronous_row", [None, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=2)])
def test_a_mixed_batch_gets_what_it_gets_with_the_tokens_read_at_once(engines, synchronous_row):
    """Every row the device can keep (greedy, penalties, stochastic, seeded), alone or with a row that reads its tokens
    at once (logprobs), which makes those steps synchronous."""
    on, off = engines("dense"), engines("dense", async_scheduling=False)
    assert on.llm_engine.async_scheduling and not off.llm_engine.async_scheduling
    reference = off.generate({"prompt_token_ids": PROMPTS[1]}, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    stop_token = reference[0].outputs[0].token_ids[4]  # a token that does come: the request stops early on it
    params = list(ELIGIBLE)
    params[1] = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_token])
    if synchronous_row is not None:
        params[2] = synchronous_row
    torch.manual_seed(3)  # the unseeded row draws from the process's generator: the same draws in both runs
    got = run(on.llm_engine, PROMPTS, params)
    torch.manual_seed(3)
    want = run(off.llm_engine, PROMPTS, params)
    assert {k: summary(v) for k, v in got.items()} == {k: summary(v) for k, v in want.items()}
    assert got["r1"].outputs[0].finish_reason == "stop" and len(got["r1"].outputs[0].token_ids) < 12


def test_the_next_step_starts_before_the_last_tokens_are_read(engines):
    engine = engines("dense").llm_engine
    engine.add_request("a", {"prompt_token_ids": PROMPTS[0]}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert engine.step() == []  # the prefill's token is still on its way back
    assert engine._in_flight is not None and engine._in_flight.items[0].seq.pending == 1
    counts = []
    while engine.has_unfinished_requests():
        counts += [len(o.outputs[0].token_ids) for o in engine.step()]
    assert counts == [1, 2, 3, 4, 5, 6]  # one step late, every token once
    assert engine._in_flight is None  # the last token was read before a step past the end could be scheduled


def test_an_abort_while_a_token_is_in_flight_ends_that_request_alone(engines):
    on, off = engines("dense"), engines("dense", async_scheduling=False)
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)] * 3
    got = run(on.llm_engine, PROMPTS[:3], params, abort_at={4: "r1"})
    want = run(off.llm_engine, PROMPTS[:3], params)
    assert summary(got["r0"][0]) == summary(want["r0"]) and summary(got["r2"][0]) == summary(want["r2"])
    aborted, at = got["r1"]
    assert at < 4 and not aborted.finished  # nothing after the abort: not the token that was in flight
    assert aborted.outputs[0].token_ids == want["r1"].outputs[0].token_ids[: len(aborted.outputs[0].token_ids)]
    scheduler = on.llm_engine.scheduler
    assert not scheduler.running and scheduler.blocks.num_free == scheduler.blocks.size


def test_the_sequence_length_limit_is_never_passed(checkpoints):
    from hylo import LLM

    llm = LLM(checkpoints("dense"), device="cpu", progress=False, kv_cache_memory_bytes=8 << 20, max_model_len=20)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:2]], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [20 - len(PROMPTS[0]), 20 - len(PROMPTS[1])]
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


def test_preempting_a_sequence_with_a_token_in_flight_reads_it_back_first(checkpoints, engines, monkeypatch):
    from hylo import LLM

    ref = engines("dense")
    prompts = random_prompts([40, 33, 25, 47, 30, 38], seed=12)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = [ref.generate({"prompt_token_ids": p}, params)[0].outputs[0].token_ids for p in prompts]
    shapes, dtype = ref.llm_engine.model.cache_shapes(), ref.llm_engine.dtype
    slot, block = shapes.slot_bytes(dtype), shapes.block_bytes(16, dtype)
    small = LLM(checkpoints("dense"), device="cpu", progress=False, kv_cache_memory_bytes=slot + block + 12 * slot,
                max_model_len=128, max_num_seqs=6)
    scheduler = small.llm_engine.scheduler
    raised = []
    schedule = scheduler.schedule

    def counting():
        try:
            return schedule()
        except PendingPreemption:
            raised.append(True)
            raise

    monkeypatch.setattr(scheduler, "schedule", counting)
    outs = small.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert raised and scheduler.num_preemptions > 0
    assert scheduler.blocks.num_free == scheduler.blocks.size and scheduler.slots.num_free == scheduler.slots.size


@pytest.mark.parametrize("options", [dict(enable_prefix_caching=True)])
def test_prefix_caching_reads_every_token_at_once(engines, options):
    """Its block hashes need the real tokens, so it keeps the synchronous path."""
    assert not engines("dense", **options).llm_engine.async_scheduling


@pytest.mark.parametrize("through", ["step channel", "pipes"])
def test_at_tp2_the_workers_take_the_driver_s_tokens_on_the_device(checkpoints, through):
    """The workers' input ids hold a placeholder where the driver's last tokens go; each step broadcasts them inside
    the step. A worker that kept its placeholder would run another token than the driver: other outputs. A step too
    large for the step channel reaches the workers through the pipes, its tokens (on the driver's device) left out."""
    from hylo import LLM

    params = [p for p in ELIGIBLE if p is not None]
    results = {}
    for on in (True, False):
        llm = LLM(checkpoints("dense"), device="cpu", progress=False, tensor_parallel_size=2, kv_cache_memory_bytes=64 << 20,
                  async_scheduling=on)
        try:
            engine = llm.llm_engine
            if through == "pipes":
                engine.executor.channel.fits = lambda packed: False
            driver = engine.executor.driver
            broadcasts, last_tokens = [], driver._last_tokens
            driver._last_tokens = lambda step, tokens: broadcasts.append(step.pending) or last_tokens(step, tokens)
            torch.manual_seed(3)  # the unseeded row draws from the process's generator: the same draws in both runs
            results[on] = {k: summary(v) for k, v in run(engine, PROMPTS[: len(params)], params).items()}
            assert engine.async_scheduling == on and bool(broadcasts) == on
        finally:
            llm.shutdown()
    assert results[True] == results[False]


def test_at_tp2_preemption_n2_chunked_prefill_and_an_abort_give_the_synchronous_outputs(checkpoints):
    """Tokens in flight through preemptions (a cache for a few sequences), seeded n=2, penalties, chunked prompts."""
    from hylo import LLM

    prompts = random_prompts([40, 33, 25, 47, 30, 38], seed=13)
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=21, n=2, max_tokens=25, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=35, ignore_eos=True, repetition_penalty=1.1),
              SamplingParams(temperature=0.7, seed=22, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)]
    results = {}
    for on in (True, False):
        llm = LLM(checkpoints("dense"), device="cpu", progress=False, tensor_parallel_size=2, async_scheduling=on, kv_cache_memory_bytes=64 << 20)
        shapes, dtype = llm.llm_engine.executor.driver.shapes, llm.llm_engine.dtype
        llm.shutdown()
        llm = LLM(checkpoints("dense"), device="cpu", progress=False, tensor_parallel_size=2, async_scheduling=on, max_model_len=128,
                  max_num_seqs=6, max_num_batched_tokens=24,
                  kv_cache_memory_bytes=shapes.slot_bytes(dtype) + shapes.block_bytes(16, dtype) + 12 * shapes.slot_bytes(dtype))
        try:
            engine = llm.llm_engine
            last = run(engine, prompts, params, abort_at={9: "r5"})
            assert engine.scheduler.num_preemptions > 0
            assert engine.scheduler.blocks.num_free == engine.scheduler.blocks.size
            results[on] = {k: summary(out) for k, (out, _) in last.items() if k != "r5"}  # r5's last output may differ by a step
        finally:
            llm.shutdown()
    assert results[True] == results[False]


def test_at_tp2_a_worker_killed_with_tokens_in_flight_is_reported_not_waited_for(checkpoints):
    """Killed just before the driver broadcasts the last step's tokens: the step fails with WorkerDied within 30 s, and
    shutdown returns."""
    import os
    import signal
    import threading
    import time

    from hylo import LLM
    from hylo.engine.executor import WorkerDied

    llm = LLM(checkpoints("dense"), device="cpu", progress=False, tensor_parallel_size=2, kv_cache_memory_bytes=64 << 20)
    engine = llm.llm_engine
    worker = engine.executor.procs[0]
    outcome = []
    try:
        for i, p in enumerate(PROMPTS[:4]):
            engine.add_request(f"r{i}", {"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        for _ in range(3):
            engine.step()
        assert engine._in_flight is not None
        driver, last_tokens = engine.executor.driver, engine.executor.driver._last_tokens

        def killing(step, tokens):
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(5)
            return last_tokens(step, tokens)

        driver._last_tokens = killing

        def steps():
            try:
                for _ in range(100):
                    engine.step()
            except Exception as e:
                outcome.append(e)

        start = time.monotonic()
        stepping = threading.Thread(target=steps, daemon=True)
        stepping.start()
        stepping.join(30)
        assert outcome and isinstance(outcome[0], WorkerDied) and time.monotonic() - start < 30, outcome
    finally:
        closing = threading.Thread(target=llm.shutdown, daemon=True)
        closing.start()
        closing.join(30)
        assert not closing.is_alive(), "shutdown hung"
        assert not worker.is_alive()


def test_a_sequence_at_its_length_limit_costs_the_others_no_overlap(checkpoints, engines):
    """Staggered max_tokens: each sequence's last token is in flight while the others' next step is scheduled and
    launched; none is read back early, and every length is exact."""
    from hylo import LLM

    llm = LLM(checkpoints("dense"), device="cpu", progress=False, kv_cache_memory_bytes=64 << 20)
    engine = llm.llm_engine
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (3, 5, 6, 8, 9, 11)]
    early, scheduled = [], [False]
    schedule, read_back, step = engine.scheduler.schedule, engine._read_back, engine.step
    engine.scheduler.schedule = lambda: scheduled.__setitem__(0, True) or schedule()
    engine._read_back = lambda touched: early.append(scheduled[0] is False) or read_back(touched)
    engine.step = lambda: scheduled.__setitem__(0, False) or step()
    got = run(engine, PROMPTS, params)
    want = run(engines("dense", async_scheduling=False).llm_engine, PROMPTS, params)
    assert {k: summary(v) for k, v in got.items()} == {k: summary(v) for k, v in want.items()}
    assert [len(got[f"r{i}"].outputs[0].token_ids) for i in range(6)] == [3, 5, 6, 8, 9, 11]
    assert early and not any(early), "a token was read back before the next step was scheduled"

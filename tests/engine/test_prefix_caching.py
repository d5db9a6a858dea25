"""Prefix caching gives the tokens and logprobs of the engine without it (which equals HF), computes only what the
cache does not hold, never shares across adapters, and leaves no block, slot or snapshot behind."""

import pytest

from hylo import LLM, LoRARequest, SamplingParams
from tests.conftest import MAX_RANK, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
BLOCK = 16


def cached_engine(checkpoints, kind="dense", **options) -> LLM:
    return LLM(checkpoints(kind), device="cpu", progress=False, enable_prefix_caching=True, **options)


class ComputedTokens:
    """Counts the tokens the model computes (every rank's step input), by wrapping the engine's executor."""

    def __init__(self, llm: LLM):
        self.total = 0
        executor = llm.llm_engine.executor
        call = executor.call

        def counting(method, *args):
            if method == "execute":
                self.total += len(args[0].input_ids)
            return call(method, *args)

        executor.call = counting

    def during(self, fn) -> int:
        before = self.total
        fn()
        return self.total - before


def generate(llm, prompts, params=GREEDY, lora=None):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=lora)


def assert_same(got, expected):
    for a, b in zip(got, expected, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            for token, lp in lb.items():
                assert la[token].logprob == pytest.approx(lp.logprob, abs=1e-4)


def assert_nothing_held(llm):
    """Every block back (cached ones idle, no references), every state slot free, no books or pending snapshots."""
    scheduler = llm.llm_engine.scheduler
    prefix = scheduler.prefix
    assert not scheduler.running and not scheduler.waiting
    assert scheduler.blocks.num_free == scheduler.blocks.size and not any(prefix.blocks.refs)
    assert scheduler.slots.num_free == scheduler.slots.size
    assert not prefix.tracks and not prefix.pending and not prefix.blocks_ahead and not prefix.snapshots_ahead
    assert not prefix.rolling and not prefix.writing
    assert prefix.snapshots.free.num_free + len(prefix.snapshots.entry_of) == prefix.snapshots.size


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_prompts_sharing_none_some_or_all_blocks_equal_the_uncached_engine(kind, checkpoints, engines):
    base, other, a, b, c = random_prompts([150, 70, 30, 20, 25], seed=31)
    prompts = [
        base,
        other,  # shares nothing
        base[:16] + a,  # one block, with no snapshot at its end yet: computed whole (and snapshotted there)
        base[:100] + b,  # many blocks, off the snapshot grid: resumes on the grid, snapshots the branch point
        base[:100] + a,  # resumes at the branch point
        base,  # all of it: resumes before the last token
        base[:90],  # a prefix of an earlier prompt
        base + c,  # an earlier prompt is its prefix
        base[:128],  # a multiple of the block size (the last token is still computed)
        base[:128],
    ]
    expected = [generate(engines(kind), [p])[0] for p in prompts]
    llm = cached_engine(checkpoints, kind)
    prefix = llm.llm_engine.scheduler.prefix
    counter = ComputedTokens(llm)
    decode = GREEDY.max_tokens - 1
    computed, hits = [], []
    for prompt, want in zip(prompts, expected):
        before = prefix.hits
        computed.append(counter.during(lambda: assert_same(generate(llm, [prompt]), [want])) - decode)
        hits.append(prefix.hits - before)
    grid = prefix.interval
    assert grid == 64  # the tiny model's snapshot costs as much as ~54 tokens of KV: four blocks
    assert hits[:3] == [0, 0, 0]
    assert hits[3] == grid and hits[4] == 96  # the branch point at 96 was snapshotted by the request before
    assert hits[5] == 144  # the last block boundary before the last token
    assert hits[7] == 144
    assert hits[8] == 96 and hits[9] == 112  # base[:96] was snapshotted as a branch point; then its own last boundary
    assert computed == [len(p) - h for p, h in zip(prompts, hits)]
    # The same prompts at once, in one batch, against the cache they filled.
    assert_same(generate(llm, prompts), expected)
    assert_nothing_held(llm)


def test_requests_arriving_together_compute_their_shared_prefix_once(checkpoints, engines):
    shared, *tails = random_prompts([100] + [20] * 6, seed=40)
    prompts = [shared + t for t in tails]
    one = SamplingParams(temperature=0, max_tokens=1, logprobs=2)
    llm = cached_engine(checkpoints)
    counter = ComputedTokens(llm)
    computed = counter.during(lambda: assert_same(generate(llm, prompts, one), generate(engines("dense"), prompts, one)))
    # The first computes all; the others wait for it. The second resumes from the grid snapshot at 64 and snapshots
    # the branch point at 96 (the end of the shared blocks), where the other four, waiting for it, resume.
    assert computed == 120 + (120 - 64) + 4 * (120 - 96)
    assert_nothing_held(llm)


def test_parallel_samples_of_one_prompt_share_it(checkpoints, engines):
    prompt = random_prompts([90], seed=44)[0]
    params = SamplingParams(temperature=1.0, n=3, max_tokens=6, seed=7, logprobs=1)
    llm = cached_engine(checkpoints)
    expected = generate(engines("dense"), [prompt], params)[0].outputs
    got = generate(llm, [prompt], params)[0].outputs
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert llm.llm_engine.scheduler.prefix.hits == 2 * 80  # the other two waited for the first, then resumed
    assert_nothing_held(llm)


def test_a_request_aborted_while_it_waits_for_a_shared_prefix(checkpoints):
    llm = cached_engine(checkpoints)
    engine = llm.llm_engine
    shared, *tails = random_prompts([100, 10, 12, 14], seed=45)
    for i, tail in enumerate(tails):
        engine.add_request(f"r{i}", {"prompt_token_ids": shared + tail}, GREEDY)
    engine.step()  # the first computes up to the snapshot grid; the others wait for its blocks
    assert len(engine.scheduler.running) == 1 and len(engine.scheduler.prefix.tracks) == 3
    engine.abort_request("r1")
    while engine.has_unfinished_requests():
        engine.step()
    assert_nothing_held(llm)


def test_a_conversation_prefills_only_what_each_turn_adds(checkpoints, engines):
    reference, llm = engines("dense"), cached_engine(checkpoints)
    counter = ComputedTokens(llm)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    history = []
    for turn, new in enumerate(random_prompts([40, 23, 31, 18, 27], seed=32)):
        prompt = history + new
        expected = generate(reference, [prompt], params)
        computed = counter.during(lambda: assert_same(got := generate(llm, [prompt], params), expected)) - (params.max_tokens - 1)
        output = expected[0].outputs[0].token_ids
        if turn:  # resumed at the last block boundary the previous turn computed: recomputes at most a block of it
            assert computed <= len(new) + BLOCK
        history = prompt + output
    assert_nothing_held(llm)


def ending_by_stop_token(reference, prompt, at) -> SamplingParams:
    """Greedy params whose answer to `prompt` ends by a stop token (as a chat answer ends by EOS), `at` tokens or more
    in: the first token of the greedy answer from there on that it has not emitted before."""
    probe = greedy_answer(reference, prompt, at + 30)
    stop = next(t for k, t in enumerate(probe) if k >= at and t not in probe[:k])
    return SamplingParams(temperature=0, max_tokens=at + 30, ignore_eos=True, stop_token_ids=[stop], logprobs=2)


def ending_by_stop_string(reference, prompt, at) -> SamplingParams:
    """Greedy params whose answer to `prompt` ends by a stop string, `at` tokens or more in: the text of the first
    token from there on whose text (two characters or more) the answer has not shown before."""
    probe, decode = greedy_answer(reference, prompt, at + 30), reference.llm_engine.tokenizer.decode
    for k in range(at, len(probe)):
        before, text = decode(probe[:k]), decode(probe[k : k + 1])
        if len(text) > 1 and "\ufffd" not in text and text not in before + text[:-1]:
            return SamplingParams(temperature=0, max_tokens=at + 30, ignore_eos=True, stop=[text], logprobs=2)
    raise AssertionError("no token with a text of its own in the probe")


def greedy_answer(llm, prompt, max_tokens) -> list[int]:
    return generate(llm, [prompt], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))[0].outputs[0].token_ids


def converse(reference, llm, news, ending, at=2 * BLOCK) -> list[int]:
    """Turns that each resend the history (prompts and answers, as a chat template closes each turn with its end
    token) plus new tokens, every answer ended by `ending` (at least `at` tokens long); each turn's tokens and logprobs
    are the uncached engine's. The tokens each turn computed, besides its decode steps."""
    counter, history, computed = ComputedTokens(llm), [], []
    for new in news:
        prompt = history + new
        params = ending(reference, prompt, at)
        expected = generate(reference, [prompt], params)
        computed.append(counter.during(lambda: assert_same(generate(llm, [prompt], params), expected)))
        output = expected[0].outputs[0]
        assert output.finish_reason == "stop" and len(output.token_ids) > at
        computed[-1] -= len(output.token_ids) - 1
        history = prompt + output.token_ids
    return computed


@pytest.mark.parametrize("ending", [ending_by_stop_token, ending_by_stop_string])
def test_a_conversation_whose_answers_end_by_a_stop_resumes_at_the_end_of_each_answer(ending, checkpoints, engines):
    reference, llm = engines("dense"), cached_engine(checkpoints)
    news = random_prompts([40, 23, 31, 18, 27], seed=46)
    computed = converse(reference, llm, news, ending)
    # Each turn resumes from the rolling snapshot the previous answer published: a block of it at most is computed
    # again (without it, the whole answer of 32 tokens or more would be).
    assert all(c <= len(new) + BLOCK for c, new in zip(computed[1:], news[1:], strict=True))
    assert_nothing_held(llm)


def test_a_conversation_with_tensor_parallelism_equals_the_uncached_engine(checkpoints, engines):
    llm = cached_engine(checkpoints, "moe", tensor_parallel_size=2)
    news = random_prompts([37, 21, 26], seed=47)
    try:
        computed = converse(engines("moe"), llm, news, ending_by_stop_token)
        assert_nothing_held(llm)
    finally:
        llm.llm_engine.shutdown()
    assert all(c <= len(new) + BLOCK for c, new in zip(computed[1:], news[1:], strict=True))


def step_until(engine, done) -> None:
    while not done():
        assert engine.has_unfinished_requests()
        engine.step()


def rolling(prefix, seq) -> int | None:
    """The rolling snapshot entry `seq` holds."""
    return prefix.tracks[seq].rolling if seq in prefix.tracks else None


def test_parallel_samples_each_publish_their_own_answer(checkpoints, engines):
    llm = cached_engine(checkpoints)
    engine, prefix = llm.llm_engine, llm.llm_engine.scheduler.prefix
    prompt, new = random_prompts([30, 20], seed=48)
    # Each answer ends by length with 89 tokens computed: its next turn resumes at 80 from the answer's own rolling
    # snapshot (the grid's, at 64, would leave more than a block to compute).
    params = SamplingParams(temperature=1.0, n=2, max_tokens=60, ignore_eos=True, seed=9)
    engine.add_request("r", {"prompt_token_ids": prompt}, params)
    children = engine.requests["r"].sequences
    step_until(engine, lambda: all(rolling(prefix, c) is not None for c in children))
    assert rolling(prefix, children[0]) != rolling(prefix, children[1])  # each its own entry, never one for both
    answers = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            answers = {c.index: c.token_ids for c in out.outputs}
    expected = generate(engines("dense"), [prompt], params)[0].outputs
    assert [answers[0], answers[1]] == [c.token_ids for c in expected] and answers[0] != answers[1]
    assert_nothing_held(llm)
    counter, greedy = ComputedTokens(llm), SamplingParams(temperature=0, max_tokens=1)
    for answer in answers.values():  # each answer's next turn resumes within a block of that answer's end
        assert counter.during(lambda: generate(llm, [prompt + answer + new], greedy)) <= len(new) + BLOCK


def test_an_aborted_request_publishes_nothing(checkpoints):
    llm = cached_engine(checkpoints)
    engine, prefix = llm.llm_engine, llm.llm_engine.scheduler.prefix
    prompt = random_prompts([30], seed=49)[0]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    engine.add_request("gone", {"prompt_token_ids": prompt}, params)
    seq = engine.requests["gone"].sequences[0]
    step_until(engine, lambda: rolling(prefix, seq) is not None)
    step_until(engine, lambda: seq.num_computed > prefix.tracks[seq].rolled)
    cached = dict(prefix.snapshots.entry_of)
    engine.abort_request("gone")
    assert prefix.snapshots.entry_of == cached
    assert_nothing_held(llm)


def test_rolling_snapshots_under_a_tiny_snapshot_pool_give_way(checkpoints, engines):
    reference = engines("dense")
    shapes, dtype = reference.llm_engine.model.cache_shapes(), reference.llm_engine.dtype
    slot, block = shapes.slot_bytes(dtype), shapes.block_bytes(BLOCK, dtype)
    # Eight state slots and two snapshots for eight sequences decoding at once, more arriving as they go.
    llm = cached_engine(checkpoints, kv_cache_memory_bytes=block + 21 * slot - 1, max_model_len=128, max_num_seqs=8)
    engine, prefix = llm.llm_engine, llm.llm_engine.scheduler.prefix
    assert (engine.scheduler.slots.size, prefix.snapshots.size) == (8, 2)
    taken = []
    take_rolling = prefix._take_rolling

    def record():
        taken.append(take_rolling())
        return taken[-1]

    prefix._take_rolling = record
    prompts = random_prompts([20, 37, 25, 41, 18, 33, 29, 35, 22, 39, 27, 31], seed=50)
    params = SamplingParams(temperature=0, max_tokens=45, ignore_eos=True, logprobs=2)
    answers = {}

    def step(times):
        for _ in range(times):
            answers.update({out.request_id: out for out in engine.step() if out.finished})

    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
        if i % 4 == 3:
            step(20)  # the next ones arrive while these decode
    while engine.has_unfinished_requests():
        step(1)
    assert_same([answers[str(i)] for i in range(len(prompts))], generate(reference, prompts, params))
    assert any(entry is not None for entry in taken)  # a prompt's snapshot took a decoding sequence's entry
    assert_nothing_held(llm)


def test_eviction_and_preemption_under_a_tiny_cache_keep_tokens(checkpoints, engines):
    reference = engines("dense")
    shapes, dtype = reference.llm_engine.model.cache_shapes(), reference.llm_engine.dtype
    slot, block = shapes.slot_bytes(dtype), shapes.block_bytes(BLOCK, dtype)
    # Four state slots, two snapshots and 20 KV blocks: fewer than four sequences of ~130 tokens need at once, even
    # sharing a 64-token prefix.
    llm = cached_engine(checkpoints, kv_cache_memory_bytes=slot + block + 12 * slot, max_model_len=160, max_num_seqs=4)
    scheduler = llm.llm_engine.scheduler
    assert (scheduler.slots.size, scheduler.prefix.snapshots.size, scheduler.blocks.size) == (4, 2, 20)
    shared_when_preempted = []
    preempt = scheduler._preempt

    def preempt_and_record(seq):
        shared_when_preempted.append(any(scheduler.blocks.refs[b] > 1 for b in seq.block_ids))
        preempt(seq)

    scheduler._preempt = preempt_and_record
    shared, *tails = random_prompts([64] + [24, 27, 30, 25, 29, 26, 28], seed=33)
    prompts = [shared + t for t in tails]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
    expected = generate(reference, prompts, params)
    assert_same(generate(llm, prompts, params), expected)
    assert_same(generate(llm, prompts[::-1], params), expected[::-1])
    assert any(shared_when_preempted)  # a sequence was preempted while another shared its cached blocks
    computed = [p + e.outputs[0].token_ids[:-1] for p, e in zip(prompts, expected)]
    distinct_blocks = {tuple(t[: (j + 1) * BLOCK]) for t in computed for j in range(len(t) // BLOCK)}
    assert len(distinct_blocks) > scheduler.blocks.size  # so cached blocks were evicted along the way
    assert_nothing_held(llm)


def test_the_same_tokens_under_other_adapters_never_share(checkpoints, adapters, engines):
    options = dict(enable_lora=True, max_loras=2, max_lora_rank=MAX_RANK)
    reference, llm = engines("dense", **options), cached_engine(checkpoints, **options)
    # The reference engine is shared with other test files: adapter ids here are 9201 and up.
    loras = [None, LoRARequest("a", 9201, adapters("dense", seed=41)), LoRARequest("b", 9202, adapters("dense", seed=42))]
    prompt = random_prompts([100], seed=34)[0]
    expected = [generate(reference, [prompt], lora=lora)[0] for lora in loras]
    prefix = llm.llm_engine.scheduler.prefix
    for lora, want in zip(loras, expected):  # one after another: each finds only the others' entries
        assert_same(generate(llm, [prompt], lora=lora), [want])
        assert prefix.hits == 0
    assert_same(generate(llm, [prompt] * 3, lora=loras), expected)  # now each finds its own
    assert prefix.hits == 3 * 96
    assert_nothing_held(llm)


def test_an_adapter_reloaded_from_another_path_does_not_reuse_entries(checkpoints, adapters, engines):
    reference = engines("dense", enable_lora=True, max_loras=2, max_lora_rank=MAX_RANK)
    llm = cached_engine(checkpoints, enable_lora=True, max_loras=1, max_lora_rank=MAX_RANK)
    first_path, second_path = adapters("dense", seed=43), adapters("dense", seed=44)
    first, second = LoRARequest("x", 7, first_path), LoRARequest("x", 7, second_path)
    prompt = random_prompts([90], seed=35)[0]
    prefix = llm.llm_engine.scheduler.prefix
    generate(llm, [prompt], lora=first)
    llm.remove_lora(7)
    expected = generate(reference, [prompt], lora=LoRARequest("x", 9203, second_path))
    assert_same(generate(llm, [prompt], lora=second), expected)
    assert prefix.hits == 0
    llm.remove_lora(7)  # and the same path read again is a new load: its folder may have changed
    generate(llm, [prompt], lora=second)
    assert prefix.hits == 0
    generate(llm, [prompt], lora=second)
    assert prefix.hits == 80


def test_a_second_request_on_a_shared_1k_prefix_prefills_only_its_suffix(checkpoints):
    llm = cached_engine(checkpoints, max_model_len=2048)
    counter = ComputedTokens(llm)
    shared, first, second = random_prompts([1024, 40, 37], seed=36)
    one = SamplingParams(temperature=0, max_tokens=1)
    assert counter.during(lambda: generate(llm, [shared + first], one)) == 1064
    assert counter.during(lambda: generate(llm, [shared + second], one)) == 37
    assert llm.llm_engine.scheduler.prefix.hits == 1024


def test_aborting_a_request_mid_prefill_that_holds_shared_blocks(checkpoints, engines):
    llm = cached_engine(checkpoints, max_num_batched_tokens=24)
    engine, prefix = llm.llm_engine, llm.llm_engine.scheduler.prefix
    base, tail, other = random_prompts([110, 60, 30], seed=37)
    generate(llm, [base])
    engine.add_request("gone", {"prompt_token_ids": base[:96] + tail}, GREEDY)
    engine.step()
    held = engine.requests["gone"].sequences[0].block_ids
    assert prefix.hits == 96 and all(prefix.blocks.refs[b] == 1 for b in held)
    engine.abort_request("gone")
    assert_nothing_held(llm)
    prompt = base[:96] + other
    assert_same(generate(llm, [prompt]), generate(engines("dense"), [prompt]))
    assert prefix.hits == 2 * 96


def test_requests_for_prompt_logprobs_compute_every_position(checkpoints, engines):
    prompt = random_prompts([70], seed=38)[0]
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=1)
    llm = cached_engine(checkpoints)
    prefix = llm.llm_engine.scheduler.prefix
    generate(llm, [prompt], params)
    got = generate(llm, [prompt], params)[0]
    assert prefix.hits == 0
    expected = generate(engines("dense"), [prompt], params)[0]
    assert got.outputs[0].token_ids == expected.outputs[0].token_ids
    assert len(got.prompt_logprobs) == len(prompt)
    for a, b in zip(got.prompt_logprobs[1:], expected.prompt_logprobs[1:], strict=True):
        assert a.keys() == b.keys()
        for token, lp in b.items():
            assert a[token].logprob == pytest.approx(lp.logprob, abs=1e-4)


def test_tensor_parallel_caching_equals_the_uncached_engine(checkpoints, engines):
    base, a, b = random_prompts([120, 30, 17], seed=39)
    prompts = [base + a, base[:80] + b, base + a, base[:80] + a]
    expected = generate(engines("moe"), prompts)
    llm = cached_engine(checkpoints, "moe", tensor_parallel_size=2)
    try:
        got = [generate(llm, [p])[0] for p in prompts]
        prefix = llm.llm_engine.scheduler.prefix
        assert prefix.hits == 64 + 144 + 80
        assert_nothing_held(llm)
    finally:
        llm.llm_engine.shutdown()
    assert_same(got, expected)

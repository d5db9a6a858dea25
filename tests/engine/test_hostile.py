"""Hostile input to the offline engine: every out-of-range value is refused naming its field, one request's
failure stays its own, adapters unloaded while queued, engines made and dropped in a row."""

import shutil
import threading
import weakref

import pytest
import torch

from hylo import LLM, LoRARequest, SamplingParams
from hylo.lora.peft_config import AdapterError
from hylo.sampling import InvalidParam
from tests.conftest import break_sampling, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPT = random_prompts([7], seed=31)[0]


def greedy(llm, prompt=PROMPT, lora=None):
    return llm.generate({"prompt_token_ids": prompt}, GREEDY, lora_request=lora)[0].outputs[0].token_ids


def assert_idle(llm) -> None:
    """Nothing left behind: no request, no queued or running sequence, every block and state slot free."""
    engine = llm.llm_engine
    s = engine.scheduler
    assert not engine.requests and not s.running and not s.waiting
    assert s.blocks.num_free == s.blocks.size and s.slots.num_free == s.slots.size
    if engine.lora is not None:
        assert sum(engine.lora.slot_users) == 0 and not engine.lora.refs


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0), ("n", True), ("n", 2.0),
        ("temperature", -1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "0"),
        ("top_p", 0), ("top_p", 1.5), ("top_p", float("nan")),
        ("top_k", -2), ("top_k", 2**63), ("top_k", 1.5),
        ("min_p", -0.1), ("min_p", 2), ("presence_penalty", 3), ("frequency_penalty", float("-inf")),
        ("repetition_penalty", 1e-40), ("repetition_penalty", 0), ("repetition_penalty", 1e3), ("repetition_penalty", float("nan")),
        ("max_tokens", 0), ("max_tokens", "5"), ("max_tokens", True), ("min_tokens", -1),
        ("logprobs", -1), ("logprobs", True),
        ("stop", [""]), ("stop", 5), ("stop", ["x"] * 257),
        ("stop_token_ids", [-1]), ("stop_token_ids", "5"), ("stop_token_ids", [1.5]),
        ("seed", "x"), ("seed", 1.5),
    ],
)
def test_sampling_params_refuse_out_of_range_values_naming_the_field(field, value):
    with pytest.raises(InvalidParam) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field and field in str(e.value)


def test_min_tokens_above_max_tokens_is_refused():
    with pytest.raises(InvalidParam) as e:
        SamplingParams(max_tokens=3, min_tokens=4)
    assert e.value.param == "min_tokens"


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ({"prompt_token_ids": PROMPT}, SamplingParams(n=129), "n"),
        ({"prompt_token_ids": PROMPT}, SamplingParams(logprobs=21), "logprobs"),
        ({"prompt_token_ids": PROMPT}, SamplingParams(stop_token_ids=[320], min_tokens=2), "stop_token_ids"),
        ({"prompt_token_ids": PROMPT}, SamplingParams(stop_token_ids=[10**30]), "stop_token_ids"),
        ({"prompt_token_ids": [1, 320]}, GREEDY, "prompt"),
        ({"prompt_token_ids": [1, True]}, GREEDY, "prompt"),
        ({"prompt_token_ids": []}, GREEDY, "prompt"),
        ({"prompt_token_ids": [1] * 600}, GREEDY, "prompt"),
        (12, GREEDY, "prompt"),
        ({"prompt_token_ids": PROMPT}, {"temperature": 0}, "sampling_params"),
    ],
)
def test_the_engine_refuses_what_exceeds_its_limits_and_keeps_serving(engines, prompt, params, field):
    llm = engines("dense")
    expected = greedy(llm)
    with pytest.raises(InvalidParam) as e:
        llm.generate(prompt, params)
    assert e.value.param == field
    assert greedy(llm) == expected
    assert_idle(llm)


def test_extreme_values_inside_the_ranges_run(engines):
    llm = engines("dense")
    expected = greedy(llm)
    for params in (
        SamplingParams(temperature=1e-40, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=1e-300, max_tokens=8, ignore_eos=True, seed=3),
    ):
        assert llm.generate({"prompt_token_ids": PROMPT}, params)[0].outputs[0].token_ids == expected  # the limit is greedy
    for params in (
        SamplingParams(temperature=1.0, top_k=2**31 - 1, max_tokens=8, seed=1, ignore_eos=True),
        SamplingParams(temperature=1.0, repetition_penalty=0.01, max_tokens=8, seed=1, ignore_eos=True),
        SamplingParams(temperature=1.0, repetition_penalty=100, max_tokens=8, seed=1, ignore_eos=True),
        SamplingParams(temperature=1e6, max_tokens=8, seed=1, ignore_eos=True, logprobs=20),
    ):
        out = llm.generate({"prompt_token_ids": PROMPT}, params)[0]
        assert out.error is None and len(out.outputs[0].token_ids) == 8
    assert_idle(llm)


def test_a_request_whose_sampling_raises_fails_alone(engines, monkeypatch):
    llm = engines("moe")
    prompts = random_prompts([5, 9, 14], seed=32)
    expected = [greedy(llm, p) for p in prompts]
    break_sampling(monkeypatch, seed=666, message="boom")
    bad = SamplingParams(temperature=0.5, seed=666, max_tokens=8, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in [prompts[0], PROMPT, prompts[1], prompts[2]]], [GREEDY, bad, GREEDY, GREEDY])
    assert [o.outputs[0].token_ids for o in (outs[0], outs[2], outs[3])] == expected
    assert outs[1].error == "sampling failed: boom" and outs[1].outputs[0].finish_reason == "error"
    assert all(o.error is None for o in outs if o is not outs[1])
    assert_idle(llm)


def test_non_finite_logits_fail_only_their_request(checkpoints, adapters):
    """An adapter slot holding NaN (written behind the loader's back: the loader refuses such files) poisons only
    the requests that use it; the base model and another adapter in the same batch are unaffected."""
    llm = LLM(checkpoints("dense"), device="cpu", progress=False, enable_lora=True, max_loras=2, max_lora_rank=8)
    good = LoRARequest("good", 1, adapters("dense", seed=1))
    broken = LoRARequest("broken", 2, adapters("dense", seed=2))
    prompts = random_prompts([6, 11], seed=33)
    expected = [greedy(llm, prompts[0]), greedy(llm, prompts[1], good)]
    llm.add_lora(broken)
    for tensors in llm.llm_engine.executor.driver.lora.images[2].values():
        for t in tensors:
            t.fill_(float("nan"))
    for params in (GREEDY, SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)):
        outs = llm.generate([{"prompt_token_ids": p} for p in (prompts[0], PROMPT, prompts[1])], params, lora_request=[None, broken, good])
        assert "not finite" in outs[1].error and outs[1].outputs[0].finish_reason == "error"
        if params is GREEDY:
            assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == expected
        assert outs[0].error is None and outs[2].error is None
    assert_idle(llm)


def test_unloading_an_adapter_while_its_requests_queue(checkpoints, adapters):
    """max_num_seqs=1: the second request waits in the queue when the adapter is removed; both finish with it."""
    llm = LLM(checkpoints("dense"), device="cpu", progress=False, enable_lora=True, max_loras=1, max_lora_rank=8, max_num_seqs=1)
    lora = LoRARequest("a", 1, adapters("dense", seed=3))
    prompts = random_prompts([5, 8], seed=34)
    expected = [greedy(llm, p, lora) for p in prompts]
    engine = llm.llm_engine
    for i, p in enumerate(prompts):
        engine.add_request(f"q{i}", {"prompt_token_ids": p}, GREEDY, lora)
    engine.step()
    assert engine.scheduler.waiting and llm.remove_lora(1)
    assert 1 not in llm.list_loras()
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    assert [done["q0"], done["q1"]] == expected
    assert 1 not in engine.lora.host and engine.lora.slot_lora == [None] and not engine.lora.draining
    assert_idle(llm)
    with pytest.raises(AdapterError):  # the id is free again, and its folder is read anew
        llm.add_lora(LoRARequest("a", 1, "/nonexistent"))


def run_engine(engine) -> dict[str, object]:
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return done


def test_an_adapter_read_runs_off_the_step_loop(checkpoints, adapters, monkeypatch):
    """An adapter that fell out of host memory is read again on a thread while the base request keeps decoding;
    its own request waits in the queue, then gets the adapter's tokens."""
    llm = LLM(checkpoints("dense"), device="cpu", progress=False, enable_lora=True, max_loras=1, max_cpu_loras=1, max_lora_rank=8)
    a, b = (LoRARequest(n, i + 1, adapters("dense", seed=40 + i)) for i, n in enumerate("ab"))
    expected = greedy(llm, lora=a)
    llm.add_lora(b)  # host memory holds one adapter: a is dropped
    engine = llm.llm_engine
    assert 1 not in engine.lora.host
    store, gate = engine.executor.driver.lora, threading.Event()
    real = store.register
    monkeypatch.setattr(store, "register", lambda request: (gate.wait(30), real(request)))
    engine.add_request("base", {"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    engine.add_request("a", {"prompt_token_ids": PROMPT}, GREEDY, a)
    while not (outs := engine.step()) or not outs[0].outputs[0].token_ids:
        pass
    for _ in range(4):
        engine.step()
    assert len(engine.requests["base"].sequences[0].output_ids) >= 5 and not engine.requests["a"].sequences[0].output_ids
    gate.set()
    done = run_engine(engine)
    assert done["a"].outputs[0].token_ids == expected and done["a"].error is None
    assert_idle(llm)


def test_an_adapter_refused_when_read_again_fails_its_requests_only(checkpoints, adapters, tmp_path):
    llm = LLM(checkpoints("dense"), device="cpu", progress=False, enable_lora=True, max_loras=1, max_cpu_loras=1, max_lora_rank=8)
    shutil.copytree(adapters("dense", seed=42), tmp_path / "a")
    a, b = LoRARequest("a", 1, str(tmp_path / "a")), LoRARequest("b", 2, adapters("dense", seed=43))
    llm.add_lora(a)
    llm.add_lora(b)  # a is dropped from host memory...
    shutil.rmtree(tmp_path / "a")  # ...and its folder is gone when a request asks for it again
    expected = greedy(llm)
    engine = llm.llm_engine
    engine.add_request("a", {"prompt_token_ids": PROMPT}, GREEDY, a)
    engine.add_request("base", {"prompt_token_ids": PROMPT}, GREEDY)
    done = run_engine(engine)
    assert "does not exist" in done["a"].error and done["a"].outputs[0].finish_reason == "error"
    assert done["base"].outputs[0].token_ids == expected and done["base"].error is None
    assert 1 not in engine.lora.host and not engine.lora.busy
    assert_idle(llm)


def test_an_interrupted_generate_leaves_nothing_running(engines, monkeypatch):
    llm = engines("dense")
    engine = llm.llm_engine
    real, calls = engine.step, []

    def step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(engine, "step", step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([{"prompt_token_ids": p} for p in random_prompts([4, 9], seed=35)], SamplingParams(max_tokens=50, ignore_eos=True))
    monkeypatch.undo()
    assert_idle(llm)


def test_engines_made_and_dropped_in_a_row_free_everything(checkpoints):
    models = []
    for i in range(10):
        llm = LLM(checkpoints("moe"), device="cpu", progress=False, kv_cache_memory_bytes=1 << 22)
        models.append(weakref.ref(llm.llm_engine.model))
        assert len(greedy(llm)) == 8
        if i % 2:
            llm.shutdown()
            with pytest.raises(RuntimeError, match="shut down"):
                greedy(llm)
        del llm
        assert models[-1]() is None, "the model (and its caches) must be freed when the LLM is dropped"
    with LLM(checkpoints("dense"), device="cpu", progress=False) as llm:
        model = weakref.ref(llm.llm_engine.model)
        greedy(llm)
    assert model() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ten_cuda_engines_in_a_row_each_get_the_memory_back(checkpoints):
    """Each engine sizes its cache from gpu_memory_utilization; a dropped engine's memory must count as free."""
    for _ in range(10):
        llm = LLM(checkpoints("dense"), device="cuda", dtype="float32", progress=False, max_num_seqs=4)
        assert len(greedy(llm)) == 8
        del llm
    assert torch.cuda.memory_allocated() < 64 << 20


# -- beyond issue 12's list: the offline API's own boundary ----------------------------------------------


@pytest.mark.parametrize("field, value", [("ignore_eos", "no"), ("ignore_eos", 1), ("skip_special_tokens", None), ("skip_special_tokens", "false")])
def test_sampling_params_refuse_non_boolean_flags(field, value):
    with pytest.raises(InvalidParam) as e:  # "no" is truthy: it used to turn ignore_eos on; None failed in the detokenizer
        SamplingParams(**{field: value})
    assert e.value.param == field


def test_refusals_do_not_echo_huge_values():
    for field, value in (("stop", ["x"] * 10_000), ("stop_token_ids", [-1] * 100_000)):
        with pytest.raises(InvalidParam) as e:
            SamplingParams(**{field: value})
        assert e.value.param == field and len(str(e.value)) < 300 and "items" in str(e.value)


@pytest.mark.parametrize(
    "field, value",
    [("n", 0), ("max_tokens", 0), ("temperature", float("nan")), ("top_k", "x"), ("stop_token_ids", [-1]), ("ignore_eos", "yes")],
)
def test_sampling_params_changed_after_they_were_made_are_checked_again(engines, field, value):
    """A dataclass can be changed after its checks ran: n=0 made a request with no sequence, and generate() waited
    for it forever; the others reached the sampler, or were silently ignored."""
    llm = engines("dense")
    params = SamplingParams(temperature=0, max_tokens=8)
    setattr(params, field, value)
    with pytest.raises(InvalidParam) as e:
        llm.llm_engine.add_request("changed", {"prompt_token_ids": PROMPT}, params)  # not generate(): it would hang
    assert e.value.param == field
    assert greedy(llm) == greedy(llm)
    assert_idle(llm)


def test_a_stop_string_set_after_the_params_were_made_is_one_string(engines):
    llm = engines("dense")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    params.stop = "no such text"  # a string, not a list of its characters
    out = llm.generate("count: 1 2", params)[0].outputs[0]
    assert out.finish_reason == "length" and params.stop == ["no such text"]
    assert_idle(llm)


def test_top_p_below_float32_resolution_keeps_the_most_likely_token(engines):
    """top_p=1e-320 is in (0, 1] but is 0 in float32: no token was kept and sampling failed; now it keeps the most
    likely token alone, which is greedy."""
    llm = engines("dense")
    expected = greedy(llm)
    for top_p in (1e-320, 1e-300, 1e-45):
        out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=1.0, top_p=top_p, max_tokens=8, ignore_eos=True, seed=5))[0]
        assert out.error is None and out.outputs[0].token_ids == expected
    assert_idle(llm)


def test_a_long_stop_token_list_does_not_slow_the_batch(engines):
    """stop_token_ids were searched as a list after every token of every sequence: one request with 10^6 repeated ids
    made each step of the whole batch seconds long. Duplicates are dropped and the ids looked up in a set."""
    import time

    llm = engines("dense")
    params = dict(temperature=1.0, n=16, max_tokens=24, ignore_eos=True, seed=9)
    t = time.monotonic()
    plain = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(**params))[0]
    plain_s = time.monotonic() - t
    t = time.monotonic()
    stops = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(**params, stop_token_ids=[319] * 1_000_000, min_tokens=2))[0]
    stops_s = time.monotonic() - t
    assert stops.error is None and all(len(c.token_ids) >= 2 for c in stops.outputs)
    assert stops_s < plain_s + 2.0, f"{stops_s:.1f} s with a 10^6-id stop list, {plain_s:.1f} s without"
    assert_idle(llm)


@pytest.mark.parametrize(
    "call, param",
    [
        (lambda llm: llm.generate("\ud800", GREEDY), "prompt"),
        (lambda llm: llm.generate({"prompt_token_ids": PROMPT}, 5), "sampling_params"),
        (lambda llm: llm.generate({"prompt_token_ids": PROMPT}, {}), "sampling_params"),
        (lambda llm: llm.generate({"prompt_token_ids": PROMPT}, []), "sampling_params"),
        (lambda llm: llm.generate({"prompt_token_ids": PROMPT}, [None]), "sampling_params"),
        (lambda llm: llm.generate({"prompt_token_ids": PROMPT}, GREEDY, lora_request=5), "lora_request"),
        (lambda llm: llm.generate({"prompt_token_ids": PROMPT}, GREEDY, lora_request="sql"), "lora_request"),
        (lambda llm: llm.generate({"prompt_token_ids": PROMPT}, GREEDY, lora_request=[5]), "lora_request"),
        (lambda llm: llm.generate({"prompt_token_ids": PROMPT}, GREEDY, lora_request={"a": 1}), "lora_request"),
        (lambda llm: llm.add_lora(None), "lora_request"),
        (lambda llm: llm.add_lora("/adapters/sql"), "lora_request"),
        (lambda llm: llm.remove_lora(None), "lora_int_id"),
        (lambda llm: llm.remove_lora("sql"), "lora_int_id"),
        (lambda llm: llm.remove_lora([1]), "lora_int_id"),
        (lambda llm: llm.remove_lora(LoRARequest("sql", 1, "/adapters/sql")), "lora_int_id"),
    ],
)
def test_wrong_types_in_the_offline_api_are_refused_naming_the_argument(engines, call, param):
    """They used to end in TypeError / AttributeError from inside, silently use the defaults ({} or [] as
    sampling_params), or (remove_lora("sql")) answer False."""
    llm = engines("dense", enable_lora=True, max_loras=1, max_lora_rank=8)
    expected = greedy(llm)
    with pytest.raises(InvalidParam) as e:
        call(llm)
    assert e.value.param == param
    assert greedy(llm) == expected
    assert_idle(llm)


@pytest.mark.parametrize("args", [(5, 1, "/a"), ("", 1, "/a"), ("a", True, "/a"), ("a", 1, 5), ("a", 1, None), ("a", 1, "")])
def test_lora_requests_check_their_fields(args):
    with pytest.raises(ValueError, match="LoRARequest"):
        LoRARequest(*args)


def test_one_id_for_two_folders_in_one_generate_is_refused_before_anything_loads(checkpoints, adapters):
    llm = LLM(checkpoints("dense"), device="cpu", progress=False, enable_lora=True, max_loras=2, max_lora_rank=8)
    a, b = LoRARequest("a", 1, adapters("dense", seed=50)), LoRARequest("b", 1, adapters("dense", seed=51))
    with pytest.raises(AdapterError, match="lora_int_id 1"):
        llm.generate([{"prompt_token_ids": PROMPT}] * 2, GREEDY, lora_request=[a, b])
    assert llm.list_loras() == set()  # b was loaded (the last of the two won) before a's request failed
    assert greedy(llm, lora=a) == greedy(llm, lora=a)
    assert_idle(llm)


@pytest.mark.parametrize(
    "config, field",
    [
        ({"r": 2.5}, "'r'"), ({"r": True}, "'r'"), ({"lora_alpha": float("nan")}, "'lora_alpha'"),
        ({"target_modules": 5}, "target_modules"), ({"target_modules": [["q_proj"]]}, "target_modules"),
        ({"target_modules": "((("}, "target_modules"), ({"exclude_modules": 7}, "exclude_modules"),
        ({"layers_to_transform": "x"}, "layers_to_transform"), ({"rank_pattern": {"q_proj": "x"}}, "rank_pattern"),
        ({"rank_pattern": [1]}, "rank_pattern"), ({"alpha_pattern": {"(": 4}}, "alpha_pattern"), ({"use_rslora": "yes"}, "use_rslora"),
    ],
)
def test_adapter_configs_of_the_wrong_types_are_refused_naming_the_field(engines, adapters, tmp_path, config, field):
    """r=2.5 was truncated to 2 and loaded; the others failed inside the loader ("reading it failed: TypeError(...)")."""
    import json

    folder = tmp_path / "adapter"
    shutil.copytree(adapters("dense", seed=52, r=4), folder)
    raw = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**raw, **config}))
    llm = engines("dense", enable_lora=True, max_loras=1, max_lora_rank=8)
    expected = greedy(llm)
    with pytest.raises(AdapterError) as e:
        llm.add_lora(LoRARequest("typed", 7, str(folder)))
    assert field in str(e.value) and "reading it failed" not in str(e.value), str(e.value)
    assert greedy(llm) == expected
    assert_idle(llm)


def test_an_adapter_removed_while_its_folder_is_read_again_stays_removed(checkpoints, adapters):
    """It fell out of host memory; a request for it starts a new read; remove_lora() meanwhile. The request is
    served with it, and then it is gone: it used to come back (listed, held in memory) once the read finished."""
    llm = LLM(checkpoints("dense"), device="cpu", progress=False, enable_lora=True, max_loras=1, max_cpu_loras=1, max_lora_rank=8)
    a, b = (LoRARequest(n, i + 1, adapters("dense", seed=53 + i)) for i, n in enumerate("ab"))
    expected = greedy(llm, lora=a)
    llm.add_lora(b)  # a is dropped from host memory
    engine = llm.llm_engine
    engine.add_request("a", {"prompt_token_ids": PROMPT}, GREEDY, a)
    assert 1 in engine.lora.to_read and llm.remove_lora(1)  # its read starts at the next step
    assert run_engine(engine)["a"].outputs[0].token_ids == expected
    assert llm.list_loras() == {2} and 1 not in engine.lora.host and not engine.lora.forget_when_read
    # Removed while being read with no request waiting for it (the request aborted): dropped when the read ends.
    llm.add_lora(a)
    llm.add_lora(b)  # a is dropped from host memory again
    engine.add_request("a2", {"prompt_token_ids": PROMPT}, GREEDY, a)
    assert 1 in engine.lora.to_read  # its read starts at the next step
    assert llm.remove_lora(1)
    engine.abort_request("a2")
    run_engine(engine)
    while engine.lora.busy:
        engine.poll_adapters()
    assert llm.list_loras() == {2} and 1 not in engine.lora.host
    # Removed during the read, then added back: it stays.
    llm.add_lora(a)
    llm.add_lora(b)
    engine.add_request("a3", {"prompt_token_ids": PROMPT}, GREEDY, a)
    assert 1 in engine.lora.to_read  # its read starts at the next step
    assert llm.remove_lora(1)
    llm.add_lora(a)
    assert run_engine(engine)["a3"].outputs[0].token_ids == expected
    assert llm.list_loras() == {1, 2}
    assert_idle(llm)


@pytest.mark.parametrize(
    "messages, kwargs, field",
    [
        (None, {}, "messages"), ("hi", {}, "messages"), ([], {}, "messages"),
        ([{"role": "user", "content": "a"}, [{"role": "user", "content": "b"}]], {}, "messages"),
        ([{"role": "user", "content": "a"}], {"chat_template_kwargs": "x"}, "chat_template_kwargs"),
    ],
)
def test_chat_refuses_malformed_messages_naming_the_argument(checkpoints, messages, kwargs, field):
    llm = LLM(checkpoints("dense"), device="cpu", progress=False, kv_cache_memory_bytes=1 << 22)
    with pytest.raises(InvalidParam) as e:
        llm.chat(messages, SamplingParams(max_tokens=2), **kwargs)
    assert e.value.param == field
    assert len(llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2, ignore_eos=True))[0].outputs[0].token_ids) == 2

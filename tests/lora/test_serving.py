"""Many adapters at once: mixed batches, slot swapping, the base path untouched, and the adapter API."""

import pytest
import torch

from hylo import LLM, LoRARequest, SamplingParams
from tests.conftest import MAX_RANK, hf_peft_greedy, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def test_mixed_batch_with_slot_swaps_equals_each_request_alone(checkpoints, adapters):
    """Base + 3 adapters (ranks 1, 6, 9) with 2 device slots: slots must be reloaded mid-run."""
    folders = [adapters("dense", seed=10 + i, r=r) for i, r in enumerate([1, 6, 9])]
    requests = [None] + [LoRARequest(f"m{i}", 50 + i, f) for i, f in enumerate(folders)]
    prompts = random_prompts([6, 14, 3, 9, 20, 5, 11, 8], seed=41)
    loras = [requests[i % 4] for i in range(len(prompts))]
    llm = LLM(checkpoints("dense"), device="cpu", progress=False, enable_lora=True, max_loras=2, max_lora_rank=9, max_cpu_loras=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, lora_request=loras)
    for prompt, lora, out in zip(prompts, loras, outs):
        ref, _ = hf_peft_greedy("dense", checkpoints("dense"), lora.lora_path if lora else None, prompt, 10)
        assert out.outputs[0].token_ids == ref
    slots = llm.llm_engine.lora
    assert len(slots.load_seconds) >= 3, "three adapters over two slots: a slot is reloaded mid-run"
    assert slots.slot_users == [0, 0]
    assert len(slots.host) <= 2, "max_cpu_loras bounds the adapters kept in host memory"


def test_room_is_made_in_host_memory_before_a_read_starts(checkpoints, adapters):
    """max_cpu_loras counts the adapters being read: the least recently used idle one is forgotten on every rank
    before the read starts (its pinned image's memory is then free for the new one), not after it."""
    folders = [adapters("dense", seed=60 + i) for i in range(3)]
    llm = LLM(checkpoints("dense"), device="cpu", progress=False, enable_lora=True, max_loras=1, max_lora_rank=MAX_RANK, max_cpu_loras=2)
    slots, store = llm.llm_engine.lora, llm.llm_engine.executor.driver.lora
    for i in range(2):
        llm.generate({"prompt_token_ids": [3, 4]}, GREEDY, lora_request=LoRARequest(f"h{i}", 70 + i, folders[i]))
    assert list(slots.host) == [70, 71] and set(store.images) == {70, 71}
    assert not slots.start(LoRARequest("h2", 72, folders[2]))  # its read is asked for, and starts at the next poll
    slots.poll()
    assert 70 not in slots.host and 70 not in store.images, "the least recently used one made room first"
    out = llm.generate({"prompt_token_ids": [3, 4]}, GREEDY, lora_request=LoRARequest("h2", 72, folders[2]))
    assert out[0].outputs[0].token_ids == hf_peft_greedy("dense", checkpoints("dense"), folders[2], [3, 4], 10)[0]
    assert list(slots.host) == [71, 72]


def test_a_call_reads_its_new_adapters_side_by_side(checkpoints, adapters):
    """generate() reads every adapter it needs up front (a refused one raises before anything runs), all at once: each
    read here waits until the three are under way together, which reads one after another would never reach."""
    import threading

    folders = [adapters("dense", seed=100 + i) for i in range(3)]
    llm = LLM(checkpoints("dense"), device="cpu", progress=False, enable_lora=True, max_loras=3, max_lora_rank=MAX_RANK)
    store = llm.llm_engine.executor.driver.lora
    together, register = threading.Barrier(3, timeout=30), store.register
    store.register = lambda request: (together.wait(), register(request))[1]
    requests = [LoRARequest(f"t{i}", 110 + i, f) for i, f in enumerate(folders)]
    outs = llm.generate([{"prompt_token_ids": [2, 3]}] * 3, GREEDY, lora_request=requests)
    for out, r in zip(outs, requests):
        assert out.outputs[0].token_ids == hf_peft_greedy("dense", checkpoints("dense"), r.lora_path, [2, 3], 10)[0]


def test_an_adapter_asked_for_with_new_ones_is_the_last_to_go(checkpoints, adapters):
    """generate([new k2, k0]) with room for two: k0 was used less recently than k1, but asking for it counts as a
    use, so the room for k2 comes from k1 and k0 is not read again."""
    folders = [adapters("dense", seed=80 + i) for i in range(3)]
    llm = LLM(checkpoints("dense"), device="cpu", progress=False, enable_lora=True, max_loras=2, max_lora_rank=MAX_RANK, max_cpu_loras=2)
    slots = llm.llm_engine.lora
    requests = [LoRARequest(f"k{i}", 90 + i, f) for i, f in enumerate(folders)]
    for r in requests[:2]:
        llm.generate({"prompt_token_ids": [5, 6]}, GREEDY, lora_request=r)
    read_of_90 = slots.generation[90]
    outs = llm.generate([{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [7, 8]}], GREEDY, lora_request=[requests[2], requests[0]])
    assert slots.generation[90] == read_of_90, "k0 stayed in host memory: it was not read again"
    assert 91 not in slots.host
    for out, r, prompt in zip(outs, [requests[2], requests[0]], [[5, 6], [7, 8]]):
        assert out.outputs[0].token_ids == hf_peft_greedy("dense", checkpoints("dense"), r.lora_path, prompt, 10)[0]


def test_lora_enabled_but_unused_equals_lora_off(checkpoints, engines):
    prompts = random_prompts([7, 30], seed=42)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5)
    off = engines("moe").generate([{"prompt_token_ids": p} for p in prompts], params)
    on = engines("moe", enable_lora=True, max_loras=2, max_lora_rank=MAX_RANK).generate([{"prompt_token_ids": p} for p in prompts], params)
    for a, b in zip(off, on):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for token, lp in la.items():
                assert lb[token].logprob == pytest.approx(lp.logprob, abs=1e-6)


def test_a_request_never_waits_for_an_unrelated_adapter(checkpoints, adapters):
    """One slot, busy with adapter A's long request: a base request and another A request still run."""
    llm = LLM(checkpoints("dense"), device="cpu", progress=False, enable_lora=True, max_loras=1, max_lora_rank=MAX_RANK)
    engine = llm.llm_engine
    a = LoRARequest("A", 1, adapters("dense", seed=20))
    b = LoRARequest("B", 2, adapters("dense", seed=21))
    engine.add_request("long-a", {"prompt_token_ids": [3, 4]}, SamplingParams(max_tokens=30, ignore_eos=True), a)
    # Adapters are read in the background, several at once: A must hold the slot before B is asked for, or B's read
    # may finish first and take it.
    while not engine.requests["long-a"].sequences[0].output_ids:
        engine.step()
    engine.add_request("b", {"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=3, ignore_eos=True), b)
    engine.add_request("base", {"prompt_token_ids": [7]}, SamplingParams(max_tokens=3, ignore_eos=True))
    engine.add_request("short-a", {"prompt_token_ids": [8]}, SamplingParams(max_tokens=3, ignore_eos=True), a)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished.index("base") < finished.index("long-a")
    assert finished.index("short-a") < finished.index("long-a")
    assert finished.index("b") > finished.index("long-a"), "B needs the only slot, held by A until it finishes"


def test_add_list_remove(checkpoints, adapters):
    llm = LLM(checkpoints("dense"), device="cpu", progress=False, enable_lora=True, max_loras=2, max_lora_rank=MAX_RANK)
    request = LoRARequest("x", 7, adapters("dense", seed=22))
    assert llm.add_lora(request)
    assert llm.list_loras() == {7}
    with_adapter = llm.generate({"prompt_token_ids": [1, 2, 3]}, GREEDY, lora_request=request)[0].outputs[0].token_ids
    assert llm.remove_lora(7) and llm.list_loras() == set()
    assert not llm.remove_lora(7)
    assert all(lora is None for lora in llm.llm_engine.lora.slot_lora)
    # A request naming the adapter brings it back from its folder.
    again = llm.generate({"prompt_token_ids": [1, 2, 3]}, GREEDY, lora_request=request)[0].outputs[0].token_ids
    assert again == with_adapter


def test_same_id_for_another_folder_is_refused(checkpoints, adapters, engines):
    llm = engines("dense", enable_lora=True, max_loras=2, max_lora_rank=MAX_RANK)
    llm.add_lora(LoRARequest("one", 900, adapters("dense", seed=23)))
    with pytest.raises(ValueError, match="lora_int_id 900 is already 'one'"):
        llm.add_lora(LoRARequest("two", 900, adapters("dense", seed=24)))


def test_lora_request_without_enable_lora(engines, adapters):
    with pytest.raises(ValueError, match="without enable_lora=True"):
        engines("dense").generate({"prompt_token_ids": [1]}, GREEDY, lora_request=LoRARequest("x", 1, adapters("dense")))


def test_adapter_bin_format(checkpoints, engines, adapters, tmp_path):
    from safetensors.torch import load_file
    import shutil

    folder = tmp_path / "bin"
    shutil.copytree(adapters("dense", seed=25), folder)
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    llm = engines("dense", enable_lora=True, max_loras=2, max_lora_rank=MAX_RANK)
    out = llm.generate({"prompt_token_ids": [4, 5]}, GREEDY, lora_request=LoRARequest("bin", 901, str(folder)))[0]
    assert out.outputs[0].token_ids == hf_peft_greedy("dense", checkpoints("dense"), str(folder), [4, 5], 10)[0]

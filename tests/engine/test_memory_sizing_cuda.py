"""gpu_memory_utilization bounds the whole process on a CUDA device (marked `gpu`, skipped elsewhere): the cache gets
what the weights, the measured peak of the largest step and the measured decode graphs leave of it."""

import pytest
import torch

from hylo import LLM, LoRARequest, SamplingParams
from tests.conftest import MAX_RANK, random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SEQS, PROMPT = 256, 480  # the largest batch, of prompts near the tiny model's 512 positions, all prefilled in one step
# float32 and ~123k tokens in one step: its activations are large even on the tiny model, so a cache sized without
# them overruns the bound.
OPTIONS = dict(dtype="float32", max_num_seqs=SEQS, max_num_batched_tokens=SEQS * PROMPT, enable_lora=True, max_loras=2,
               max_lora_rank=MAX_RANK, progress=False)
SHARE = 12 << 30  # what the engine may take beyond what the device uses already (the cache gets the rest of it)


def utilization_for(share: int, device: torch.device | None = None) -> float:
    """The gpu_memory_utilization that leaves the engine `share` bytes beyond what the device uses now."""
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return (total - free + share) / total


def test_the_largest_batch_of_long_prompts_stays_within_gpu_memory_utilization(checkpoints, adapters):
    util = utilization_for(SHARE)
    free, total = torch.cuda.mem_get_info()
    bound = util * total
    outside_torch = total - free - torch.cuda.memory_reserved()  # the CUDA context, other processes
    torch.cuda.reset_peak_memory_stats()
    llm = LLM(checkpoints("dense"), device="cuda", gpu_memory_utilization=util, **OPTIONS)
    try:
        lora = LoRARequest("sized", 41, adapters("dense", seed=401))
        llm.add_lora(lora)  # read before the batch starts, so that the first step admits every sequence
        prompts = [{"prompt_token_ids": p} for p in random_prompts([PROMPT] * SEQS, seed=400)]
        params = SamplingParams(temperature=1.0, top_p=0.9, logprobs=5, max_tokens=8, ignore_eos=True)
        outs = llm.generate(prompts, params, lora_request=[lora if i % 2 else None for i in range(SEQS)])
        assert [len(o.outputs[0].token_ids) for o in outs] == [8] * SEQS
        assert llm.llm_engine.executor.driver.graphs is not None  # the decode steps replayed graphs
        assert llm.llm_engine.scheduler.num_preemptions == 0
        assert torch.cuda.max_memory_reserved() + outside_torch <= bound
        assert total - torch.cuda.mem_get_info()[0] <= bound  # everything, torch's allocator or not
    finally:
        llm.shutdown()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_each_rank_stays_within_gpu_memory_utilization_at_tp2(checkpoints):
    """Each rank measures its own share in its own process; the plan fits the smallest."""
    devices = [torch.device("cuda", rank) for rank in range(2)]
    util = max(utilization_for(SHARE, device) for device in devices)
    llm = LLM(checkpoints("dense"), device="cuda", gpu_memory_utilization=util, tensor_parallel_size=2, **OPTIONS)
    try:
        prompts = [{"prompt_token_ids": p} for p in random_prompts([PROMPT] * SEQS, seed=410)]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        assert [len(o.outputs[0].token_ids) for o in outs] == [8] * SEQS
        for device in devices:
            free, total = torch.cuda.mem_get_info(device)
            assert total - free <= util * total, device
    finally:
        llm.shutdown()


def test_a_utilization_that_cannot_hold_one_step_is_refused_at_start_up(checkpoints):
    util = utilization_for(32 << 20)  # the weights fit in 32 MiB more, one step of ~123k float32 tokens does not
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=.*peak activations"):
        LLM(checkpoints("dense"), device="cuda", gpu_memory_utilization=util, **OPTIONS)

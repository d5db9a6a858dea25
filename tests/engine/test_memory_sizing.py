"""The profiling steps that size the cache on a GPU (hylo.engine.profiling): the largest shapes the scheduler can
make, and steps a rank runs against the throwaway cache (here on the CPU; tests/engine/test_memory_sizing_cuda.py
checks the sizing itself)."""

import torch

from hylo.config import read_model_config
from hylo.distributed import TPGroup
from hylo.engine.config import EngineConfig
from hylo.engine.profiling import longest_step, profile_plan, widest_step
from hylo.engine.worker import ModelWorker
from tests.conftest import MAX_RANK


def test_the_widest_step_fills_the_token_budget_over_every_sequence():
    config = EngineConfig(model="unused", max_num_batched_tokens=100, max_num_seqs=8, enable_lora=True, max_loras=3)
    step = widest_step(config, max_model_len=64)
    assert step.query_lens == [13] * 4 + [12] * 4 and step.context_lens == [0] * 8 and len(step.input_ids) == 100
    assert len(step.logits_indices) == 8 + 8  # a sampled row per sequence, and the prompt-logprob rows a step may add
    assert step.lora_slots == [0, 1, 2, 0, 1, 2, 0, 1]
    # No sequence longer than max_model_len: fewer tokens than the budget when the sequences cannot hold it.
    assert widest_step(EngineConfig(model="unused", max_num_batched_tokens=100, max_num_seqs=2), max_model_len=30).query_lens == [30, 30]


def test_the_longest_step_ends_a_sequence_of_max_model_len():
    step = longest_step(EngineConfig(model="unused", max_num_batched_tokens=16), max_model_len=100)
    assert (step.context_lens, step.query_lens, step.positions[-1], step.block_tables) == ([84], [16], 99, [list(range(7))])
    assert longest_step(EngineConfig(model="unused", max_num_batched_tokens=500), max_model_len=100).context_lens == [1]


def test_a_rank_runs_the_profiling_steps_against_the_throwaway_cache(checkpoints):
    config = EngineConfig(model=checkpoints("dense"), max_num_batched_tokens=100, max_num_seqs=8, enable_lora=True, max_loras=2,
                          max_lora_rank=MAX_RANK)
    cpu = torch.device("cpu")
    worker = ModelWorker(config, read_model_config(config.model), TPGroup(), cpu, torch.float32, progress=False)
    max_model_len = 64
    caches = profile_plan(config, max_model_len).allocate(worker.shapes, config.block_size, torch.float32, cpu)
    worker.caches = caches
    vocab = worker.model_config.text.vocab_size
    assert worker.execute(widest_step(config, max_model_len)).shape == (16, vocab)
    assert worker.execute(longest_step(config, max_model_len)).shape == (1, vocab)
    worker._run_largest_steps(caches, max_model_len)  # the sampler too, as start-up runs it on a GPU

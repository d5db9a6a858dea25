"""The dummy steps start-up runs to measure one step's peak memory: the largest shapes the scheduler can make.

Two shapes bound a step's activations, and neither contains the other: many sequences (the GDN layers
gather a state per sequence, the sampler works on a row of logits per sequence) and a long context (a
prefill chunk that continues a sequence reads its whole history from the KV cache). Both steps use one
throwaway cache: every sequence writes the same state slot and the same blocks, which is wrong for
the values and right for the memory.
"""

from __future__ import annotations

from hylo.batch import StepInput
from hylo.engine.cache import CachePlan
from hylo.engine.config import EngineConfig
from hylo.sampling import SampleInput, SamplingParams


def profile_plan(config: EngineConfig, max_model_len: int) -> CachePlan:
    """The throwaway cache the profiling steps (and a trial capture of the decode graphs) run against: the blocks
    of one sequence of max_model_len tokens and one state slot."""
    return CachePlan(num_blocks=-(-max_model_len // config.block_size), num_slots=1)


def widest_step(config: EngineConfig, max_model_len: int) -> StepInput:
    """max_num_batched_tokens tokens of fresh prompts spread over as many sequences as may run, each sampling a
    row, plus as many prompt-logprob rows of logits as the scheduler lets a step add (max_num_seqs)."""
    tokens = min(config.max_num_batched_tokens, config.max_num_seqs * max_model_len)
    seqs = min(config.max_num_seqs, tokens)
    lengths = [tokens // seqs + (i < tokens % seqs) for i in range(seqs)]
    step = _step([(0, n) for n in lengths], config)
    step.logits_indices += list(range(min(config.max_num_seqs, tokens)))
    return step


def longest_step(config: EngineConfig, max_model_len: int) -> StepInput:
    """One prefill chunk of max_num_batched_tokens tokens (or what fits) that ends a sequence of max_model_len."""
    chunk = min(config.max_num_batched_tokens, max_model_len - 1)
    return _step([(max_model_len - chunk, chunk)], config)


def sampler_inputs(rows: int, max_logprobs: int) -> list[SampleInput]:
    """Rows sampled the most expensive way: logprobs (the raw distribution kept alongside) and top-p (a sort)."""
    params = SamplingParams(temperature=1.0, top_p=0.9, logprobs=max_logprobs)
    return [SampleInput(params, prompt_ids=[], output_ids=[], child=0) for _ in range(rows)]


def _step(seqs: list[tuple[int, int]], config: EngineConfig) -> StepInput:
    """(cached tokens, new tokens) per sequence; every sequence's block table is blocks 0, 1, ..., so a position's
    KV slot is the position itself, and all share state slot 0. With LoRA, the sequences use every adapter slot."""
    positions, tables, logits_indices = [], [], []
    for context, n in seqs:
        positions += range(context, context + n)
        tables.append(list(range(-(-(context + n) // config.block_size))))
        logits_indices.append(len(positions) - 1)
    lora_slots = [i % config.max_loras if config.enable_lora else -1 for i in range(len(seqs))]
    return StepInput(
        input_ids=[0] * len(positions), positions=positions, query_lens=[n for _, n in seqs], context_lens=[c for c, _ in seqs],
        state_slots=[0] * len(seqs), block_tables=tables, slot_mapping=list(positions), logits_indices=logits_indices,
        lora_slots=lora_slots,
    )

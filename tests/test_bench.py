"""The benchmark's MoE roofline (the experts a decode step touches, against a simulation of routing), and its
long-context figures: the FLOPs they count, the cache check, and the whole path on CPU with the tiny shape."""

import random
from types import SimpleNamespace

import pytest
import torch

from hylo.bench import (decode_shortfall, decode_step_ms, measure_long_context, prefill_flops, print_long_context, step_new_tokens,
                        touched_experts, write_config)
from hylo.cli import build_parser, main
from hylo.engine.cache import CachePlan


@pytest.mark.parametrize("experts, top_k, tokens", [(256, 8, 1), (256, 8, 16), (256, 8, 64), (512, 10, 7), (10, 3, 40)])
def test_touched_experts_match_a_simulation_of_uniform_routing(experts, top_k, tokens):
    rng = random.Random(experts * tokens + top_k)
    trials = 2000
    simulated = sum(len({e for _ in range(tokens) for e in rng.sample(range(experts), top_k)}) for _ in range(trials)) / trials
    assert touched_experts(experts, top_k, tokens) == pytest.approx(simulated, rel=0.02)


def test_one_token_touches_top_k_and_many_touch_nearly_all():
    assert touched_experts(256, 8, 1) == pytest.approx(8)
    assert touched_experts(256, 8, 4096) == pytest.approx(256, rel=1e-6)
    counts = [touched_experts(256, 8, n) for n in range(1, 200)]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


# Three GDN layers and one full-attention layer; KV and key heads differ from query and value heads, so a count
# that used the wrong ones would differ.
SMALL = SimpleNamespace(layer_types=["linear_attention"] * 3 + ["full_attention"], num_attention_heads=4, num_key_value_heads=1,
                        head_dim=8, linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=4, linear_value_head_dim=6)


def test_prefill_flops_by_hand():
    flops = prefill_flops(SMALL, tokens=10, active_params=100)
    assert flops["weights"] == 2 * 100 * 10
    # 1 layer × (QKᵀ + PV) × 2 FLOPs × 4 heads × 8 dims × 55 causal pairs of 10 tokens.
    assert flops["attention"] == 1 * 2 * 2 * 4 * 8 * 55 == 7040
    # 3 layers × 2 value heads × 10 tokens × (6·4·6 with the state + 2·64·(3·4 + 2·6) within a chunk).
    assert flops["gdn"] == 3 * 2 * 10 * (144 + 3072) == 192960


def test_attention_flops_count_the_pairs_a_causal_mask_keeps():
    for tokens in (1, 7, 64, 300):
        pairs = int(torch.ones(tokens, tokens).tril().sum())
        assert prefill_flops(SMALL, tokens, 0)["attention"] == 2 * 2 * 4 * 8 * pairs


def test_prefill_flops_per_rank_split_the_heads():
    whole, rank = prefill_flops(SMALL, 512, 1000), prefill_flops(SMALL, 512, 1000, tensor_parallel_size=2)
    assert rank["weights"] == whole["weights"]  # active_params is already this rank's
    assert (rank["attention"], rank["gdn"]) == (whole["attention"] // 2, whole["gdn"] // 2)


def test_decode_shortfall_names_what_the_cache_lacks():
    plan = CachePlan(num_blocks=70, num_slots=2)
    assert decode_shortfall(plan, 16, 600, batch=2, tokens=560) is None  # 2 × 35 blocks: exactly full
    assert "72 KV blocks" in decode_shortfall(plan, 16, 600, batch=2, tokens=561)  # 2 × 36 blocks
    assert "GDN state slots" in decode_shortfall(plan, 16, 600, batch=3, tokens=100)
    assert "max_model_len=600" in decode_shortfall(plan, 16, 600, batch=1, tokens=601)


def test_step_new_tokens_outlast_a_chunked_prefill():
    assert step_new_tokens(1, 128, 8192) == 1 + 32 + 8  # one prefill step
    # 16 prompts of 32k in 8k chunks: 64 steps, and the decoding sequences take up to 15 tokens of each step's budget.
    assert step_new_tokens(16, 32768, 8192) == 65 + 32 + 8


def test_long_context_on_cpu_with_the_tiny_shape(tmp_path, capsys):
    from hylo import LLM

    context, batches, max_batched = 512, [1, 2, 3], 256  # prompts prefilled in two chunks; batch 3 > max_num_seqs
    llm = LLM(str(write_config("tiny", tmp_path / "model")), device="cpu", load_format="dummy", max_num_seqs=2, progress=False,
              max_num_batched_tokens=max_batched, max_model_len=context + step_new_tokens(2, context, max_batched))
    engine = llm.llm_engine
    try:
        short = {b: decode_step_ms(llm, b, 128, steps=4) for b in batches[:2]}
        result = measure_long_context(llm, context, batches, 128, short, flops_per_s=1e12)
        assert engine.scheduler.num_preemptions == 0  # every sequence held its blocks: no step recomputed a prompt
    finally:
        engine.shutdown()
    prefill = result["prefill"]
    assert prefill["tokens"] == context and prefill["seconds"] > 0
    assert prefill["matmul_fraction"] == pytest.approx(sum(prefill["flops"].values()) / prefill["seconds"] / 1e12)
    assert prefill["flops"]["attention"] == 2 * 2 * 2 * 4 * 64 * (512 * 513 // 2)  # tiny: 2 full-attention layers of 4 heads × 64
    ran, skipped = result["decode"][:2], result["decode"][2]
    assert [r["batch"] for r in ran] == [1, 2]
    for row in ran:
        assert row["step_ms"] > 0 and row["vs_short_context"] == pytest.approx(row["step_ms"] / short[row["batch"]])
    assert skipped["batch"] == 3 and "GDN state slots" in skipped["skipped"]
    print_long_context(result)
    text = capsys.readouterr().out
    assert "batch 3: skipped" in text and "the step at 128 tokens" in text and "% of the bf16 matmul rate" in text


def test_long_context_flag_is_off_by_default_and_refuses_a_bad_length(capsys):
    assert build_parser().parse_args(["bench"]).long_context is None
    assert build_parser().parse_args(["bench", "--long-context", "32768"]).long_context == 32768
    assert main(["bench", "--long-context", "0"]) == 2
    assert "--long-context 0" in capsys.readouterr().err


def test_every_timed_decode_step_runs_the_whole_batch_after_a_chunked_prefill(tmp_path, monkeypatch):
    """Prompts of 16 steps' budget each: the first sequence decodes while the second is prefilled, and must not finish
    before the timed steps end (or they would time a smaller batch)."""
    from hylo import LLM

    context, batch, max_batched = 512, 2, 32
    llm = LLM(str(write_config("tiny", tmp_path / "model")), device="cpu", load_format="dummy", max_num_seqs=batch, progress=False,
              max_num_batched_tokens=max_batched, max_model_len=context + step_new_tokens(batch, context, max_batched))
    engine = llm.llm_engine
    unfinished_when_all_decode = []  # requests not finished, before each step once every prompt is done (or one finished)
    step = engine.step

    def watched_step():
        if len(engine.requests) < batch or all(r.sequences[0].output_ids for r in engine.requests.values()):
            unfinished_when_all_decode.append(len(engine.requests))
        return step()

    monkeypatch.setattr(engine, "step", watched_step)
    try:
        decode_step_ms(llm, batch, context, steps=8)
    finally:
        engine.shutdown()
    assert unfinished_when_all_decode[:8] == [batch] * 8

"""The prefix cache's metrics: queries and hits in tokens (counters) and the snapshot pool's use."""

from prometheus_client.parser import text_string_to_metric_families

from hylo import LLM, SamplingParams
from hylo.server.metrics import Metrics
from tests.conftest import random_prompts


def values(metrics: Metrics) -> dict[str, float]:
    return {s.name: s.value for family in text_string_to_metric_families(metrics.render()) for s in family.samples}


def test_prefix_cache_queries_hits_and_snapshots(checkpoints):
    llm = LLM(checkpoints("dense"), device="cpu", progress=False, enable_prefix_caching=True)
    metrics = Metrics()
    prompt = random_prompts([70], seed=51)[0]
    params = SamplingParams(temperature=0, max_tokens=2)
    for _ in range(2):
        llm.generate({"prompt_token_ids": prompt}, params)
        metrics.observe_step(llm.llm_engine)
    m = values(metrics)
    assert m["hylo_prefix_cache_queries_total"] == 140 and m["hylo_prefix_cache_hits_total"] == 64
    prefix = llm.llm_engine.scheduler.prefix
    assert m["hylo_prefix_cache_snapshots_used"] == len(prefix.snapshots.entry_of) > 0
    assert m["hylo_prefix_cache_snapshots_total"] == prefix.snapshots.size
    assert m["hylo_prefix_cache_blocks"] == prefix.blocks.num_cached > 0
    assert m["hylo_kv_blocks_used"] == 0  # cached blocks nobody uses are free to take

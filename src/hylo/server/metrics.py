"""Prometheus metrics (prometheus-client): requests, tokens, queue and cache usage, adapter loads, latency histograms.

Updated on the engine thread, rendered on the event loop; prometheus-client's own locks keep the two apart, and
it escapes label values (adapter names) as the text format requires.
"""

from __future__ import annotations

import time

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if hasattr(prometheus_client, "disable_created_metrics"):
    prometheus_client.disable_created_metrics()  # no *_created series beside each counter and histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST

GAUGES = {
    "hylo_running_sequences": "Sequences the scheduler is running",
    "hylo_waiting_sequences": "Sequences waiting to be scheduled",
    "hylo_kv_blocks_used": "Paged KV cache blocks in use (full-attention layers)",
    "hylo_kv_blocks_total": "Paged KV cache blocks",
    "hylo_gdn_slots_used": "GDN state slots in use",
    "hylo_gdn_slots_total": "GDN state slots",
    "hylo_adapter_slots_used": "Device adapter slots holding an adapter",
    "hylo_adapter_slots_total": "Device adapter slots",
    "hylo_prefix_cache_blocks": "KV blocks holding a cached prefix, in use or not (prefix caching)",
    "hylo_prefix_cache_snapshots_used": "GDN state snapshots holding a cached prefix's state or a decoding sequence's (prefix caching)",
    "hylo_prefix_cache_snapshots_total": "GDN state snapshot entries (prefix caching)",
}


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # prometheus-client adds the "_total" suffix to counters: these are hylo_requests_total and so on.
        self.requests = Counter("hylo_requests", "Finished requests by outcome (ok, aborted, error) and adapter", ("status", "adapter"), registry=r)
        self.prompt_tokens = Counter("hylo_prompt_tokens", "Prompt tokens of requests that produced a token", registry=r)
        self.generation_tokens = Counter("hylo_generation_tokens", "Generated tokens", registry=r)
        self.gauges = {name: Gauge(name, help_text, registry=r) for name, help_text in GAUGES.items()}
        self.adapter_loads = Counter("hylo_adapter_loads", "Adapter loads into device slots", registry=r)
        self.adapter_load = Histogram("hylo_adapter_load_seconds", "Time to load an adapter into a device slot", buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("hylo_time_to_first_token_seconds", "Time from arrival to the first generated token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("hylo_inter_token_latency_seconds", "Time between consecutive tokens of a request", buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_loads_seen = 0
        self.prefix_queries = Counter("hylo_prefix_cache_queries", "Prompt tokens that looked for a cached prefix", registry=r)
        self.prefix_hits = Counter("hylo_prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed)", registry=r)
        self.prefix_seen = (0, 0)

    def observe_step(self, engine) -> None:
        scheduler = engine.scheduler
        values = {
            "hylo_running_sequences": len(scheduler.running),
            "hylo_waiting_sequences": len(scheduler.waiting),
            "hylo_kv_blocks_used": scheduler.blocks.size - scheduler.blocks.num_free,
            "hylo_kv_blocks_total": scheduler.blocks.size,
            "hylo_gdn_slots_used": scheduler.slots.size - scheduler.slots.num_free,
            "hylo_gdn_slots_total": scheduler.slots.size,
            "hylo_adapter_slots_used": 0,
            "hylo_adapter_slots_total": 0,
            "hylo_prefix_cache_blocks": 0,
            "hylo_prefix_cache_snapshots_used": 0,
            "hylo_prefix_cache_snapshots_total": 0,
        }
        prefix = scheduler.prefix
        if prefix is not None:
            values["hylo_prefix_cache_blocks"] = prefix.blocks.num_cached
            values["hylo_prefix_cache_snapshots_used"] = prefix.snapshots.num_used
            values["hylo_prefix_cache_snapshots_total"] = prefix.snapshots.size
            self.prefix_queries.inc(prefix.queries - self.prefix_seen[0])
            self.prefix_hits.inc(prefix.hits - self.prefix_seen[1])
            self.prefix_seen = (prefix.queries, prefix.hits)
        lora = engine.lora
        if lora is not None:
            values["hylo_adapter_slots_used"] = sum(x is not None for x in lora.slot_lora)
            values["hylo_adapter_slots_total"] = len(lora.slot_lora)
            for seconds in lora.load_seconds[self.adapter_loads_seen :]:
                self.adapter_load.observe(seconds)
                self.adapter_loads.inc()
            self.adapter_loads_seen = len(lora.load_seconds)
        for name, value in values.items():
            self.gauges[name].set(value)

    def observe_output(self, stream, out) -> None:
        tokens = sum(len(c.token_ids) for c in out.outputs)
        new = tokens - stream.tokens
        if new <= 0:
            return
        now = time.monotonic()
        if stream.tokens == 0:
            self.prompt_tokens.inc(len(out.prompt_token_ids))
            self.ttft.observe(now - stream.arrived)
        else:
            self.itl.observe((now - stream.last_token_at) / new)
        self.generation_tokens.inc(new)
        stream.tokens, stream.last_token_at = tokens, now

    def finished(self, adapter: str, status: str) -> None:
        self.requests.labels(status=status, adapter=adapter).inc()

    def render(self) -> str:
        return generate_latest(self.registry).decode()

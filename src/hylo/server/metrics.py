"""Prometheus text metrics: requests, tokens, queue and cache usage, adapter loads, latency histograms."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, name: str, help_text: str):
        self.name, self.help = name, help_text
        self.counts = [0] * len(LATENCY_BUCKETS)
        self.total, self.n = 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(LATENCY_BUCKETS):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        lines += [f'{self.name}_bucket{{le="{b}"}} {c}' for b, c in zip(LATENCY_BUCKETS, self.counts)]
        return lines + [f'{self.name}_bucket{{le="+Inf"}} {self.n}', f"{self.name}_sum {self.total}", f"{self.name}_count {self.n}"]


class Metrics:
    """Updated on the engine thread, rendered on the event loop; a lock keeps the two apart."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.gauges: dict[str, float] = {}
        self.adapter_loads_seen = 0
        self.ttft = Histogram("hylo_time_to_first_token_seconds", "Time from arrival to the first generated token")
        self.itl = Histogram("hylo_inter_token_latency_seconds", "Time between consecutive tokens of a request")
        self.adapter_load = Histogram("hylo_adapter_load_seconds", "Time to load an adapter into a device slot")

    def observe_step(self, engine) -> None:
        scheduler = engine.scheduler
        with self.lock:
            self.gauges = {
                "hylo_running_sequences": len(scheduler.running),
                "hylo_waiting_sequences": len(scheduler.waiting),
                "hylo_kv_blocks_used": scheduler.blocks.size - scheduler.blocks.num_free,
                "hylo_kv_blocks_total": scheduler.blocks.size,
                "hylo_gdn_slots_used": scheduler.slots.size - scheduler.slots.num_free,
                "hylo_gdn_slots_total": scheduler.slots.size,
            }
            lora = engine.lora
            if lora is not None:
                self.gauges["hylo_adapter_slots_used"] = sum(x is not None for x in lora.slot_lora)
                self.gauges["hylo_adapter_slots_total"] = len(lora.slot_lora)
                for seconds in lora.load_seconds[self.adapter_loads_seen :]:
                    self.adapter_load.observe(seconds)
                self.adapter_loads_seen = len(lora.load_seconds)

    def observe_output(self, stream, out) -> None:
        tokens = sum(len(c.token_ids) for c in out.outputs)
        new = tokens - stream.tokens
        if new <= 0:
            return
        now = time.monotonic()
        with self.lock:
            if stream.tokens == 0:
                self.prompt_tokens += len(out.prompt_token_ids)
                self.ttft.observe(now - stream.arrived)
            else:
                self.itl.observe((now - stream.last_token_at) / new)
            self.generation_tokens += new
        stream.tokens, stream.last_token_at = tokens, now

    def finished(self, adapter: str, status: str) -> None:
        with self.lock:
            self.requests[(status, adapter)] += 1

    def render(self) -> str:
        with self.lock:
            lines = ["# HELP hylo_requests_total Requests by outcome and adapter", "# TYPE hylo_requests_total counter"]
            lines += [f'hylo_requests_total{{status="{s}",adapter="{a}"}} {n}' for (s, a), n in sorted(self.requests.items())]
            lines += ["# TYPE hylo_prompt_tokens_total counter", f"hylo_prompt_tokens_total {self.prompt_tokens}"]
            lines += ["# TYPE hylo_generation_tokens_total counter", f"hylo_generation_tokens_total {self.generation_tokens}"]
            for name, value in self.gauges.items():
                lines += [f"# TYPE {name} gauge", f"{name} {value}"]
            lines += ["# TYPE hylo_adapter_loads_total counter", f"hylo_adapter_loads_total {self.adapter_load.n}"]
            for h in (self.ttft, self.itl, self.adapter_load):
                lines += h.render()
        return "\n".join(lines) + "\n"

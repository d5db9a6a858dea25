"""The scheduler alone on scripts/bench_prefix_cache.py's nothing-shared workload, caching off then on: the real
scheduler and prefix cache, the model replaced by instant logits, time counted in tokens computed. It separates what
snapshot chunking costs in scheduling (when requests get their first token) from how fast the GPU computes the chunks.

python scripts/replay_prefix_schedule.py [--interval 2048]   # the 9B shape's snapshot grid (the tiny model stands in)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from bench_prefix_cache import run_at_once  # this folder's (scripts/)
from hylo import LLM
from hylo.bench import write_config


def replay(caching: bool, interval: int, requests: int, prompt_len: int, budget: int, new_tokens: int) -> tuple[float, int]:
    """(median tokens computed before a request's first token, tokens computed in all)."""
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(str(write_config("tiny", Path(tmp) / "m")), device="cpu", load_format="dummy", progress=False, max_num_seqs=requests,
                  max_num_batched_tokens=budget, max_model_len=prompt_len + new_tokens + 16, enable_prefix_caching=caching,
                  kv_cache_memory_bytes=3 << 30)
        engine = llm.llm_engine
        if caching:
            engine.scheduler.prefix.interval = interval
        vocab = engine.model_config.text.vocab_size
        computed = 0
        call = engine.executor.call

        def instant(method: str, *args):
            nonlocal computed
            if method != "execute":
                return call(method, *args)
            computed += len(args[0].input_ids)
            return [torch.zeros(len(args[0].logits_indices), vocab)]

        engine.executor.call = instant
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(1, vocab, (prompt_len,), generator=g).tolist() for _ in range(requests)]
        first = run_at_once(llm, prompts, [None] * requests, new_tokens, clock=lambda: computed)
        engine.shutdown()
        return statistics.median(first), computed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=int, default=2048)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=4160)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    for caching in (False, True):
        median, total = replay(caching, args.interval, args.requests, args.prompt_len, args.max_num_batched_tokens, args.new_tokens)
        print(f"caching {'on' if caching else 'off'}: median first token after {median:.0f} tokens computed, {total} in all")


if __name__ == "__main__":
    main()

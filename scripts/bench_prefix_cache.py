"""Prefix caching on issue #16's workloads, caching off then on, with random weights of a named shape:

  shared   `--requests` requests, each a shared `--system-len`-token system prompt + a unique `--question-len`-token
           question, spread over `--adapters` adapters, `--new-tokens` new tokens: tokens prefilled against the
           unique tokens (the system prompt once per adapter + every question), and the median time to first token;
  random   the same shape with nothing shared (what caching costs when it cannot help);
  chat     a `--turns`-turn conversation, each turn resending the history (earlier prompts and answers) plus
           `--turn-tokens` new tokens: the tokens each turn prefilled against what it added.

All requests of a workload arrive at once (the chat's turns one after another). Greedy, ignore EOS.

python scripts/bench_prefix_cache.py                       # the issue's targets: 9B shape, on the GPU
python scripts/bench_prefix_cache.py --shape tiny --device cpu --system-len 256 --question-len 16 --requests 8 \
    --new-tokens 4 --turns 3 --turn-tokens 24             # a check that it runs, on a CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from hylo import LLM, LoRARequest, SamplingParams
from hylo.bench import SHAPES, write_adapter, write_config
from hylo.engine.scheduler import Scheduled


class PrefillCounter:
    """Tokens the model computes that are not the one-token decode of a sequence: prompts, and outputs recomputed
    after a preemption."""

    def __init__(self, llm: LLM):
        self.tokens = 0
        scheduler = llm.llm_engine.scheduler
        schedule = scheduler.schedule

        def counting() -> list[Scheduled]:
            step = schedule()
            for item in step:
                seq = item.seq
                decode = item.num_tokens == 1 and item.samples and seq.num_computed >= len(seq.request.prompt_ids)
                self.tokens += 0 if decode else item.num_tokens
            return step

        scheduler.schedule = counting


def run_at_once(llm: LLM, prompts: list[list[int]], loras: list[LoRARequest | None], new_tokens: int,
                clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Every prompt added at once, stepped to the end; each request's time to first token, in seconds (or in what
    `clock` counts)."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = clock()
    for i, (prompt, lora) in enumerate(zip(prompts, loras)):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params, lora)
    first: dict[str, float] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.outputs[0].token_ids and out.request_id not in first:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                first[out.request_id] = clock() - start
    return [first[str(i)] for i in range(len(prompts))]


def measure(llm: LLM, loras: list[LoRARequest], args: argparse.Namespace, vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()  # noqa: E731
    counter = PrefillCounter(llm)
    prefix = llm.llm_engine.scheduler.prefix
    by_adapter = [loras[i % len(loras)] if loras else None for i in range(args.requests)]
    result = {}

    # Warm-up: every kernel compiled and tuned, every adapter read and in a slot (on random tokens: nothing that it
    # caches is found by what follows).
    run_at_once(llm, [tokens(args.system_len + args.question_len) for _ in by_adapter], by_adapter, 2)

    system = tokens(args.system_len)
    prompts = [system + tokens(args.question_len) for _ in by_adapter]
    before, start = counter.tokens, time.perf_counter()
    ttft = run_at_once(llm, prompts, by_adapter, args.new_tokens)
    unique = args.system_len * len({lora.lora_int_id if lora else None for lora in by_adapter}) + args.question_len * args.requests
    result["shared"] = {"prefilled": counter.tokens - before, "unique": unique, "prefilled_vs_unique": (counter.tokens - before) / unique,
                        "median_ttft_s": statistics.median(ttft), "seconds": time.perf_counter() - start}

    prompts = [tokens(args.system_len + args.question_len) for _ in by_adapter]
    before, start = counter.tokens, time.perf_counter()
    ttft = run_at_once(llm, prompts, by_adapter, args.new_tokens)
    result["random"] = {"prefilled": counter.tokens - before, "median_ttft_s": statistics.median(ttft), "seconds": time.perf_counter() - start}

    history, turns = [], []
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    for _ in range(args.turns):
        added = args.turn_tokens + (args.new_tokens if history else 0)  # the previous answer is new to the prompt too
        prompt = history + tokens(args.turn_tokens)
        before, start = counter.tokens, time.perf_counter()
        out = llm.generate({"prompt_token_ids": prompt}, params, lora_request=by_adapter[0])[0]
        turns.append({"prompt": len(prompt), "added": added, "prefilled": counter.tokens - before,
                      "seconds": time.perf_counter() - start})
        history = prompt + out.outputs[0].token_ids
    result["chat"] = turns
    if prefix is not None:
        result["prefix_cache"] = {"queries": prefix.queries, "hits": prefix.hits, "interval": prefix.interval,
                                  "snapshots": prefix.snapshots.size, "blocks": prefix.blocks.size}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen3.5-9b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--system-len", type=int, default=4096)
    parser.add_argument("--question-len", type=int, default=64)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--turn-tokens", type=int, default=200)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    longest = max(args.system_len + args.question_len, args.turns * (args.turn_tokens + args.new_tokens)) + args.new_tokens
    results = {"shape": args.shape, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d"),
               "args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_config(args.shape, Path(tmp) / "model")
        loras: list[LoRARequest] = []
        for caching in (False, True):
            llm = LLM(str(folder), device=args.device, load_format="dummy", enable_lora=args.adapters > 0, max_loras=max(1, args.adapters),
                      max_lora_rank=args.rank, max_model_len=longest, max_num_seqs=args.requests,
                      max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=caching, progress=False)
            engine = llm.llm_engine
            if not loras:
                for i in range(args.adapters):
                    write_adapter(engine.model, engine.model_config, Path(tmp) / f"a{i}", args.rank, seed=i)
                    loras.append(LoRARequest(f"a{i}", i + 1, str(Path(tmp) / f"a{i}")))
            key = "on" if caching else "off"
            results[key] = measure(llm, loras, args, engine.model_config.text.vocab_size)
            print(f"caching {key}: {json.dumps(results[key])}", flush=True)
            engine.shutdown()
            del llm, engine
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    on, off = results["on"], results["off"]
    print(f"shared prompt: prefilled {on['shared']['prefilled']} tokens with caching ({on['shared']['prefilled_vs_unique']:.2f}x the unique "
          f"{on['shared']['unique']}), {off['shared']['prefilled']} without; median TTFT {on['shared']['median_ttft_s'] * 1e3:.1f} ms vs "
          f"{off['shared']['median_ttft_s'] * 1e3:.1f} ms ({off['shared']['median_ttft_s'] / on['shared']['median_ttft_s']:.1f}x lower)")
    print(f"nothing shared: median TTFT {on['random']['median_ttft_s'] * 1e3:.1f} ms with caching, {off['random']['median_ttft_s'] * 1e3:.1f} ms "
          f"without; {on['random']['seconds']:.2f} s vs {off['random']['seconds']:.2f} s in all")
    for i, (a, b) in enumerate(zip(on["chat"], off["chat"])):
        print(f"turn {i + 1}: prompt {a['prompt']}, added {a['added']}, prefilled {a['prefilled']} with caching, {b['prefilled']} without")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Command line: `hylo generate` (more subcommands arrive with LoRA, the server and the benchmark)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from hylo.config import ModelError
from hylo.engine.config import add_engine_arguments, engine_config_from
from hylo.lora.peft_config import AdapterError


ENGINE_FLAGS_SKIPPED = ("seed",)  # `hylo generate --seed` is the sampling seed
# `hylo generate`'s sampling flags that the model's generation config (--generation-config) may give defaults for, and
# the defaults when neither gives one (greedy, 32 tokens; the others are SamplingParams').
SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")
GENERATE_DEFAULTS = {"temperature": 0.0, "max_tokens": 32}


def _generate(args: argparse.Namespace) -> int:
    from hylo import LLM, LoRARequest, SamplingParams

    model, prompts, loras, use = args.model, args.prompt, dict(args.lora or []), args.use_lora
    if model is None:
        from hylo.demo import ADAPTER_DIRS, BASE_DIR, DEMO_PROMPTS

        model, prompts = str(BASE_DIR), prompts or DEMO_PROMPTS
        loras = loras or {name: str(path) for name, path in ADAPTER_DIRS.items()}
        use = use or ["base", *ADAPTER_DIRS]
        print(f"model: the embedded demo checkpoint, adapters {', '.join(ADAPTER_DIRS)}; pass --model PATH for your own")
    use = use or ["base"]
    if not prompts:
        print("error: give at least one --prompt", file=sys.stderr)
        return 2
    unknown = [name for name in use if name != "base" and name not in loras]
    if unknown:
        print(f"error: --use-lora {unknown[0]}: no adapter of that name; add it with --lora {unknown[0]}=PATH", file=sys.stderr)
        return 2
    requests = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(loras.items())}
    options = vars(engine_config_from(args, ENGINE_FLAGS_SKIPPED, model=model, enable_lora=args.enable_lora or bool(requests),
                                      max_loras=max(args.max_loras, len(requests))))
    llm = LLM(**options)
    given = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    params = SamplingParams(**{**GENERATE_DEFAULTS, **llm.llm_engine.default_sampling, **given},
                            n=args.n, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    jobs = [(name, prompt) for prompt in prompts for name in use]
    start = time.perf_counter()
    outputs = llm.generate([p for _, p in jobs], params, lora_request=[requests.get(name) for name, _ in jobs])
    elapsed = time.perf_counter() - start
    generated = 0
    for (name, _), out in zip(jobs, outputs):
        for completion in out.outputs:
            generated += len(completion.token_ids)
            print(f"[{name}] {out.prompt!r} → {completion.text!r} ({completion.finish_reason})")
    print(f"{generated} tokens in {elapsed:.2f} s ({generated / elapsed:.1f} tokens/s, {llm.llm_engine.device}, {llm.llm_engine.dtype})")
    llm.llm_engine.shutdown()
    return 0


def _lora_pair(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"'{text}': write --lora NAME=PATH")
    return name, path


def _check_adapter(args: argparse.Namespace) -> int:
    from hylo.lora.check import check_adapter

    ok, lines = check_adapter(args.model, args.adapter, args.tp, args.max_lora_rank)
    print("\n".join(lines))
    return 0 if ok else 1


def _bench(args: argparse.Namespace) -> int:
    import torch

    from hylo.bench import print_scaling, print_table, run, write_checkpoint

    if args.long_context is not None and args.long_context < 1:
        print(f"error: --long-context {args.long_context}: give the prompt length in tokens, e.g. 32768", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: hylo bench measures a CUDA device, and none is visible", file=sys.stderr)
        return 2
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint(args.shape, Path(tmp) / "model") if args.from_disk else None
        for tp in ints(args.tensor_parallel_size):  # in one process, one after another: ratios from the same run
            runs.append(run(args.shape, ints(args.batch), ints(args.adapters), args.rank, args.prompt_len, args.new_tokens,
                            args.prefill_tokens, args.hf and not runs, None, tp, checkpoint, args.long_context))
            print_table(runs[-1])
    if len(runs) > 1:
        print_scaling(runs)
    if args.json:
        Path(args.json).write_text(json.dumps(runs[0] if len(runs) == 1 else {"runs": runs}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hylo", description="Qwen3.5 inference with many LoRA adapters")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for prompts (no --model: the embedded demo)")
    gen.add_argument("--model", help="checkpoint folder (default: the embedded demo model)")
    gen.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    model_default = "default: the model's generation config (--generation-config), else %s"
    gen.add_argument("--max-tokens", type=int, help=model_default % 32)
    gen.add_argument("--temperature", type=float, help=model_default % "0 (greedy)")
    gen.add_argument("--top-p", type=float, help=model_default % 1)
    gen.add_argument("--top-k", type=int, help=model_default % "0 (all)")
    gen.add_argument("--min-p", type=float, help=model_default % 0)
    gen.add_argument("--repetition-penalty", type=float, help=model_default % 1)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--stop", action="append")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--lora", action="append", type=_lora_pair, metavar="NAME=PATH", help="a PEFT adapter; repeat for several")
    gen.add_argument("--use-lora", action="append", metavar="NAME", help="run the prompts with this adapter ('base': none); repeat for several")
    add_engine_arguments(gen, skip=ENGINE_FLAGS_SKIPPED)
    gen.set_defaults(run=_generate)
    check = sub.add_parser("check-adapter", help="show where every adapter tensor lands (per TP rank), or why it is refused")
    check.add_argument("model", help="base checkpoint folder")
    check.add_argument("adapter", help="PEFT adapter folder")
    check.add_argument("--tp", type=int, default=1, help="tensor_parallel_size to check the split for")
    check.add_argument("--max-lora-rank", type=int, default=64)
    check.set_defaults(run=_check_adapter)
    bench = sub.add_parser("bench", help="decode/prefill speed on a named shape with random weights (needs CUDA)")
    bench.add_argument("--shape", default="qwen3.5-9b",
                       help="qwen3.5-9b, qwen3.5-27b, qwen3.5-35b-a3b, qwen3.5-35b-a3b-20l (half the layers) or tiny")
    bench.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    bench.add_argument("--adapters", default="0,1,4", help="comma-separated numbers of distinct adapters")
    bench.add_argument("--rank", type=int, default=16)
    bench.add_argument("--prompt-len", type=int, default=128)
    bench.add_argument("--new-tokens", type=int, default=128)
    bench.add_argument("--prefill-tokens", type=int, default=8192)
    bench.add_argument("--long-context", type=int, metavar="N", help="also time the prefill of one N-token prompt (e.g. 32768) and "
                       "decode steps of each --batch whose sequences hold N tokens, against the same batch at --prompt-len")
    bench.add_argument("--hf", action="store_true", help="also time HF transformers + PEFT at batch 1")
    bench.add_argument("--from-disk", action="store_true", help="write a random checkpoint to safetensors first and load it from there "
                       "(start-up then includes reading the weights)")
    bench.add_argument("--json", help="write the figures here")
    bench.add_argument("--tensor-parallel-size", default="1",
                       help="comma-separated sizes, run one after another in one process (e.g. 1,2: TP=2 against its TP=1 baseline); "
                            "weights and roofline are per rank")
    bench.set_defaults(run=_bench)
    from hylo.server.serve import add_arguments, serve

    server = sub.add_parser("serve", help="an OpenAI-compatible server (no MODEL: the embedded demo and its adapters)")
    add_arguments(server)
    server.set_defaults(run=serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ModelError, AdapterError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`hylo serve`: build the engine, pre-load adapters, run the HTTP API until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from hylo.engine.config import EngineConfig
from hylo.engine.engine import LLMEngine
from hylo.lora.request import LoRARequest

log = logging.getLogger("hylo")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="checkpoint folder (default: the embedded demo model and its adapters)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1/*")
    p.add_argument("--served-model-name", help="the base model's name in the API (default: the folder name)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: no decode graphs (slower; for debugging)")
    p.add_argument("--max-waiting", type=int, default=1024, help="queued requests beyond this get 503")
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--lora-modules", nargs="*", default=[], metavar="NAME=PATH")
    p.add_argument("--max-loras", type=int, default=4)
    p.add_argument("--max-cpu-loras", type=int)
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--allow-runtime-lora", action="store_true", help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter")
    p.add_argument("--lora-root", help="runtime adapter paths must lie inside this folder")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from hylo.server.app import ServerState, build_app  # the server's dependencies load only when serving
    from hylo.server.async_engine import AsyncEngine
    from hylo.server.metrics import Metrics

    model, modules = args.model, dict(m.split("=", 1) for m in args.lora_modules)
    if model is None:
        from hylo.demo import ADAPTER_DIRS, BASE_DIR

        model, modules = str(BASE_DIR), modules or {n: str(p) for n, p in ADAPTER_DIRS.items()}
    if args.allow_runtime_lora and not args.lora_root:
        raise ValueError("--allow-runtime-lora needs --lora-root DIR: runtime adapter paths must lie inside it")
    enable_lora = args.enable_lora or bool(modules) or args.allow_runtime_lora
    engine = LLMEngine(EngineConfig(
        model=model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        tensor_parallel_size=args.tensor_parallel_size, enable_lora=enable_lora, max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras, enforce_eager=args.enforce_eager,
    ))
    state = ServerState(
        AsyncEngine(engine, args.max_waiting, Metrics()), args.served_model_name or Path(model).name, model, args.api_key,
        Path(os.path.realpath(args.lora_root)) if args.allow_runtime_lora else None,
    )
    try:
        for name, path in modules.items():
            request = LoRARequest(name, next(state.ids), path)
            engine.add_lora(request)
            state.adapters[name] = request
        log.info("serving %s (adapters: %s) on http://%s:%d", state.served_name, ", ".join(state.adapters) or "none", args.host, args.port)
        uvicorn.run(build_app(state), host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        state.engine.stop()
    return 0

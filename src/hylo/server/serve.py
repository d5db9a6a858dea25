"""`hylo serve`: build the engine, pre-load adapters, run the HTTP API until SIGTERM or Ctrl-C.

Lifecycle:
- SIGTERM or Ctrl-C: stop accepting; every running stream ends with an error event ("the server is
  shutting down") and `data: [DONE]`, every waiting non-streaming request gets 503; then the engine and
  its workers stop and the process exits 0.
- The engine fails (a step raises, a tensor-parallel worker died): every request fails at once (503, or
  an error event and [DONE]), new ones get 503, /health fails, and the process exits 1 soon after, so
  that a supervisor restarts it. If a clean exit does not come within EXIT_DEADLINE_S, it is forced.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from pathlib import Path

from hylo.engine.config import add_engine_arguments, engine_config_from
from hylo.engine.engine import LLMEngine
from hylo.lora.request import LoRARequest
from hylo.parsers import REASONING_PARSERS, TOOL_CALL_PARSERS

log = logging.getLogger("hylo")

FAILED_EXIT_CODE = 1
FLUSH_S = 0.5  # after an engine failure: time for the error responses to go out before shutting down
EXIT_DEADLINE_S = 20.0  # after an engine failure: the process exits by then, whatever hangs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="checkpoint folder (default: the embedded demo model and its adapters)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1/*")
    p.add_argument("--served-model-name", help="the base model's name in the API (default: the folder name)")
    add_engine_arguments(p)
    p.add_argument("--max-waiting", type=int, default=1024,
                   help="sequences (n per request) that may wait beyond what the scheduler can start at once; more get 503")
    p.add_argument("--max-request-bytes", type=int, default=16 << 20, help="larger request bodies get 413 before they are read")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="render a chat template sent in a request (chat_template_kwargs.chat_template); refused otherwise")
    p.add_argument("--reasoning-parser", choices=sorted(REASONING_PARSERS),
                   help="chat: the model's thinking (before </think>) in message.reasoning_content, the rest in content")
    p.add_argument("--tool-call-parser", choices=sorted(TOOL_CALL_PARSERS),
                   help="chat: take tools, tool_calls and tool messages; read the model's tool calls with this parser")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="chat: tool_choice \"auto\" (the default with tools) returns the model's tool calls; needs --tool-call-parser")
    p.add_argument("--lora-modules", nargs="*", default=[], metavar="NAME=PATH", help="adapters to load at start-up (turns on --enable-lora)")
    p.add_argument("--allow-runtime-lora", action="store_true", help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter")
    p.add_argument("--lora-root", help="runtime adapter paths must lie inside this folder")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from hylo.server.app import ServerState, build_app  # the server's dependencies load only when serving
    from hylo.server.async_engine import AsyncEngine, default_prompt_threads
    from hylo.server.metrics import Metrics
    from hylo.server.protocol import ADAPTER_NAME, ADAPTER_NAME_RULE

    class Server(uvicorn.Server):
        """uvicorn's server, with hylo's shutdown: end the requests first (error events, 503s) so that the
        connections close at once, and exit with hylo's status instead of re-raising the signal."""

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()  # a handled SIGTERM is a clean exit (0), not death by the signal

        async def shutdown(self, sockets=None) -> None:
            state.engine.close("the server is shutting down")
            await super().shutdown(sockets=sockets)

    model, modules = args.model, dict(m.split("=", 1) for m in args.lora_modules)
    if model is None:
        from hylo.demo import ADAPTER_DIRS, BASE_DIR

        model, modules = str(BASE_DIR), modules or {n: str(p) for n, p in ADAPTER_DIRS.items()}
    for name in modules:
        if not ADAPTER_NAME.fullmatch(name):
            raise ValueError(f"--lora-modules: adapter name {name!r} must be {ADAPTER_NAME_RULE}")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (qwen3_coder for Qwen3.5)")
    if args.allow_runtime_lora and not args.lora_root:
        raise ValueError("--allow-runtime-lora needs --lora-root DIR: runtime adapter paths must lie inside it")
    for flag in ("max_waiting", "max_request_bytes"):
        if getattr(args, flag) < (0 if flag == "max_waiting" else 1):
            raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)} is out of range")
    enable_lora = args.enable_lora or bool(modules) or args.allow_runtime_lora
    engine = LLMEngine(engine_config_from(args, model=model, enable_lora=enable_lora))
    server: Server | None = None

    def on_failure(reason: str) -> None:
        """On the engine thread, once every request has been failed: shut the server down, exit non-zero."""
        def shut_down() -> None:
            time.sleep(FLUSH_S)
            if server is not None:
                server.should_exit = True
            time.sleep(EXIT_DEADLINE_S)
            log.error("the server did not exit %.0f s after its engine failed; forcing the exit", EXIT_DEADLINE_S)
            os._exit(FAILED_EXIT_CODE)

        threading.Thread(target=shut_down, name="hylo-exit", daemon=True).start()

    state = ServerState(
        AsyncEngine(engine, args.max_waiting, Metrics(), on_failure, default_prompt_threads()),
        args.served_model_name or Path(model).name, model, args.api_key,
        Path(os.path.realpath(args.lora_root)) if args.allow_runtime_lora else None,
        max_request_bytes=args.max_request_bytes, trust_request_chat_template=args.trust_request_chat_template,
        reasoning_parser=args.reasoning_parser, tool_call_parser=args.tool_call_parser, auto_tool_choice=args.enable_auto_tool_choice,
    )
    try:
        for name, path in modules.items():
            request = LoRARequest(name, next(state.ids), path)
            engine.add_lora(request)
            state.adapters[name] = request
        log.info("serving %s (adapters: %s) on http://%s:%d", state.served_name, ", ".join(state.adapters) or "none", args.host, args.port)
        config = uvicorn.Config(build_app(state), host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
        server = Server(config)
        server.run()
    finally:
        state.engine.stop()
    if state.engine.failed:
        log.error("exiting because the engine failed: %s", state.engine.failed)
        return FAILED_EXIT_CODE
    return 0


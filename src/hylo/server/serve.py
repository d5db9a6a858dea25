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
import itertools
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
    p.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="the base model's names in the API: the first is the one reported, all are accepted as `model` (default: the folder name)")
    p.add_argument("--chat-template", metavar="FILE_OR_TEMPLATE", help="the chat template to render with instead of the tokenizer's: a file, or the template itself")
    p.add_argument("--uvicorn-log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's own log level (its access log included)")
    p.add_argument("--disable-log-requests", action="store_true",
                   help="no log line when a request is admitted and when it ends (those lines hold no prompt text)")
    p.add_argument("--ssl-keyfile", help="serve HTTPS with this private key (PEM)")
    p.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM)")
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
    p.add_argument("--lora-modules", nargs="*", default=[], metavar="NAME=PATH",
                   help="adapters to load at start-up (turns on --enable-lora): NAME=PATH, or vLLM's JSON form "
                        '\'{"name": "sql", "path": "/a/sql", "base_model_name": "MODEL"}\'')
    p.add_argument("--allow-runtime-lora", action="store_true", help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter")
    p.add_argument("--lora-root", help="runtime adapter paths must lie inside this folder")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from hylo.server.app import ServerState, build_app  # the server's dependencies load only when serving
    from hylo.server.async_engine import AsyncEngine, default_prompt_threads
    from hylo.server.metrics import Metrics
    from hylo.server.protocol import ADAPTER_NAME, ADAPTER_NAME_RULE
    from hylo.server.serve_options import check_ssl_files, load_chat_template, parse_lora_module

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

    model, parsed = args.model, [parse_lora_module(m) for m in args.lora_modules]
    if "" in (args.served_model_name or []):
        raise ValueError("--served-model-name: a name must not be empty")
    # Each name once: a repeated adapter would silently keep only its last path, a repeated model name be listed twice.
    for flag, names in (("--lora-modules: adapter name", [m.name for m in parsed]), ("--served-model-name:", args.served_model_name or [])):
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            raise ValueError(f"{flag} {twice!r} is given twice; give each name once")
    modules = {m.name: m.path for m in parsed}
    if model is None:
        from hylo.demo import ADAPTER_DIRS, BASE_DIR

        model, modules = str(BASE_DIR), modules or {n: str(p) for n, p in ADAPTER_DIRS.items()}
    served_names = args.served_model_name or [Path(model).name]
    for m in parsed:
        if m.base_model_name is not None and m.base_model_name not in served_names:
            raise ValueError(f"--lora-modules: adapter {m.name!r} names base_model_name {m.base_model_name!r}, which this server does not "
                             f"serve; its --served-model-name: {', '.join(served_names)}")
    for name in modules:
        if not ADAPTER_NAME.fullmatch(name):
            raise ValueError(f"--lora-modules: adapter name {name!r} must be {ADAPTER_NAME_RULE}")
    clash = sorted(set(modules) & set(served_names))
    if clash:
        raise ValueError(f"--lora-modules: adapter name {clash[0]!r} is also a --served-model-name; give it another name")
    chat_template = load_chat_template(args.chat_template) if args.chat_template is not None else None
    check_ssl_files(args.ssl_keyfile, args.ssl_certfile)
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (qwen3_coder for Qwen3.5)")
    if args.allow_runtime_lora and not args.lora_root:
        raise ValueError("--allow-runtime-lora needs --lora-root DIR: runtime adapter paths must lie inside it")
    for flag in ("max_waiting", "max_request_bytes"):
        if getattr(args, flag) < (0 if flag == "max_waiting" else 1):
            raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)} is out of range")
    enable_lora = args.enable_lora or bool(modules) or args.allow_runtime_lora
    engine = LLMEngine(engine_config_from(args, model=model, enable_lora=enable_lora))
    if chat_template is not None:
        if engine.tokenizer is None:
            engine.shutdown()
            raise ValueError(f"--chat-template: '{model}' has no tokenizer to render chat with")
        engine.tokenizer.chat_template = chat_template  # before the prompt workers copy the tokenizer
    ids = itertools.count(1)  # adapter ids: the start-up ones, then those loaded at run time
    requests = {name: LoRARequest(name, next(ids), path) for name, path in modules.items()}
    try:
        # Before the engine thread starts: from then on only that thread may drive the engine (two threads polling the
        # adapter reads at once broke the reads' bookkeeping and, at TP>1, the workers' pipes).
        engine.add_lora(*requests.values())  # read side by side
    except BaseException:
        engine.shutdown()
        raise
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
        served_names[0], model, args.api_key,
        Path(os.path.realpath(args.lora_root)) if args.allow_runtime_lora else None,
        max_request_bytes=args.max_request_bytes, trust_request_chat_template=args.trust_request_chat_template,
        reasoning_parser=args.reasoning_parser, tool_call_parser=args.tool_call_parser, auto_tool_choice=args.enable_auto_tool_choice,
        served_aliases=tuple(served_names[1:]), log_requests=not args.disable_log_requests, ids=ids,
    )
    state.adapters.update(requests)
    try:
        scheme = "https" if args.ssl_certfile else "http"
        log.info("serving %s (adapters: %s) on %s://%s:%d", ", ".join(state.served_names), ", ".join(state.adapters) or "none", scheme,
                 args.host, args.port)
        config = uvicorn.Config(build_app(state), host=args.host, port=args.port, log_level=args.uvicorn_log_level, timeout_graceful_shutdown=5,
                                ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile)
        server = Server(config)
        server.run()
    finally:
        state.engine.stop()
    if state.engine.failed:
        log.error("exiting because the engine failed: %s", state.engine.failed)
        return FAILED_EXIT_CODE
    return 0


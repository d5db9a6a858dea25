"""The OpenAI-compatible HTTP API: routes, errors in OpenAI's shape, SSE streaming, runtime adapters."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
import uuid
from importlib.metadata import version as package_version
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from hylo.lora.peft_config import AdapterError
from hylo.lora.request import LoRARequest
from hylo.outputs import RequestOutput
from hylo.parsers import ChatOutputParser
from hylo.sampling import InvalidParam
from hylo.server.agent import choice_parsers, constrain, request_tools, template_message
from hylo.server.agent_protocol import chat_request_class
from hylo.server.async_engine import AsyncEngine, Overloaded, Unavailable
from hylo.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from hylo.server.protocol import ADAPTER_NAME, ADAPTER_NAME_RULE
from hylo.server.request_log import log_finished, log_received
from hylo.server.protocol import (
    ERROR_TYPES, ChatRequest, CompletionRequest, DetokenizeRequest, LoadAdapterRequest, TokenizeRequest, UnloadAdapterRequest, describe,
    error_body, hide_paths,
)

log = logging.getLogger("hylo")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass
class ServerState:
    engine: AsyncEngine
    served_name: str
    model_path: str
    api_key: str | None = None
    lora_root: Path | None = None  # runtime adapter loading is allowed only when set
    adapters: dict[str, LoRARequest] = field(default_factory=dict)
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    max_request_bytes: int = 16 << 20  # larger bodies get 413 before they are read
    trust_request_chat_template: bool = False  # render chat templates that requests send
    loading: set[str] = field(default_factory=set)  # adapter names being loaded now
    reasoning_parser: str | None = None  # --reasoning-parser: reasoning_content apart from content (hylo.parsers)
    tool_call_parser: str | None = None  # --tool-call-parser: tools, tool_calls, tool messages
    auto_tool_choice: bool = False  # --enable-auto-tool-choice: tool_choice "auto" parses the output for calls
    served_aliases: tuple[str, ...] = ()  # the other --served-model-names: accepted as `model`, reported as served_name
    log_requests: bool = False  # a line when each request is admitted and when it ends (not --disable-log-requests)

    @property
    def served_names(self) -> tuple[str, ...]:
        return (self.served_name, *self.served_aliases)


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_):
        yield
        # Graceful shutdown (SIGTERM, Ctrl-C): the requests have been ended (serve.py); stop the engine and its workers.
        await asyncio.to_thread(state.engine.stop)

    app = FastAPI(title="hylo", docs_url=None, redoc_url=None, lifespan=lifespan)

    def server_paths() -> dict[str, str]:
        """Server paths that error messages must not show → what the client knows them as."""
        paths = {state.model_path: state.served_name, os.path.realpath(state.model_path): state.served_name}
        root = os.path.realpath(state.lora_root) if state.lora_root is not None else None
        if root is not None:  # adapters loaded at runtime: the path the client gave, relative to --lora-root
            paths[str(state.lora_root)] = paths[root] = ""
        for name, r in state.adapters.items():  # adapters given at startup (outside --lora-root): their names
            real = os.path.realpath(r.lora_path)
            if root is None or os.path.commonpath([real, root]) != root:
                paths[r.lora_path] = paths[real] = name
        return paths

    def error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
        kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        return JSONResponse(error_body(hide_paths(message, server_paths()), kind, status, param), status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return error(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        message, param = describe(e.errors()[0], e.body)
        return error(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        """Unknown routes, wrong methods, unparseable bodies: OpenAI's shape, not FastAPI's {"detail": ...}."""
        where = f"{request.method} {request.url.path[:200]}"
        if e.status_code == 404:
            routes = ", ".join(f"{m} {r.path}" for r in app.routes if getattr(r, "include_in_schema", False) for m in sorted(r.methods - {"HEAD"}))
            return error(404, f"no route {where}; hylo serves {routes}", headers=e.headers)
        if e.status_code == 405:
            allowed = (e.headers or {}).get("Allow", "")
            return error(405, f"{where} is not allowed; use {allowed or 'another method'}", headers=e.headers)
        if e.status_code == 400 and e.detail == "There was an error parsing the body":
            return error(400, "the body could not be read: send one JSON object, encoded as UTF-8, with Content-Type: application/json", headers=e.headers)
        return error(e.status_code, str(e.detail), headers=e.headers)

    @app.exception_handler(Exception)
    async def internal(_, e: Exception):
        # Logged with its traceback by the server; the client gets OpenAI's shape, without server paths.
        return error(500, f"internal error ({type(e).__name__}: {e}); the request failed, the server goes on")

    app.add_middleware(Guard, state=state)

    @app.get("/health")
    async def health():
        if state.engine.failed:
            return JSONResponse({"status": "failed", "reason": state.engine.failed}, status_code=503)
        if state.engine.closing:
            return JSONResponse({"status": "shutting down", "reason": state.engine.closing}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.engine.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        # No server paths: the base model's root is its served name (as in vLLM); an adapter's is its name, or
        # for one loaded at runtime the path the client gave (relative to --lora-root).
        max_model_len = state.engine.engine.max_model_len
        data = [{"id": name, "object": "model", "created": created, "owned_by": "hylo", "root": state.served_name, "parent": None,
                 "max_model_len": max_model_len} for name in state.served_names]
        paths = server_paths()
        data += [
            {"id": name, "object": "model", "created": created, "owned_by": "hylo", "root": hide_paths(r.lora_path, paths), "parent": state.served_name,
             "max_model_len": max_model_len}
            for name, r in state.adapters.items()
        ]
        return {"object": "list", "data": data}

    @app.get("/version")
    async def version():
        return {"version": package_version("hylo")}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if body.model is not None:
            resolve_model(state, body.model)
        tokenizer = state.engine.engine.tokenizer
        if tokenizer is None:
            raise ApiError(400, "this model folder has no tokenizer, so there is nothing to tokenize with")
        ids = await state.engine.prompts.run(lambda tok: tok.encode(body.prompt, add_special_tokens=body.add_special_tokens))
        return {"count": len(ids), "max_model_len": state.engine.engine.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if body.model is not None:
            resolve_model(state, body.model)
        tokenizer, vocab = state.engine.engine.tokenizer, state.engine.engine.model_config.text.vocab_size
        if tokenizer is None:
            raise ApiError(400, "this model folder has no tokenizer, so there is nothing to detokenize with")
        outside = [t for t in body.tokens if not 0 <= t < min(vocab, len(tokenizer))]
        if outside:
            raise ApiError(400, f"tokens must be ids in [0, {min(vocab, len(tokenizer))}); got {outside[:5]}", "tokens")
        return {"prompt": await state.engine.prompts.run(lambda tok: tok.decode(body.tokens))}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        lora = resolve_model(state, body.model)
        prompts = split_prompts(body.prompt)
        params = make_params(body, body.logprobs, state)
        try:  # each prompt is admitted on its own: refuse a request whose prompts together could never all be
            if len(prompts) > 1 and params.n <= getattr(state.engine.engine.config, "max_n", params.n):  # else n's own 400
                state.engine.check_holds(len(prompts) * params.n, len(prompts))
        except InvalidParam as e:
            raise ApiError(400, str(e), e.param) from None
        return await respond(state, body, lora, prompts, params, chat=False, request=request)

    async def chat(body: ChatRequest, request: Request):
        lora = resolve_model(state, body.model)
        tokenizer = state.engine.engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template; use /v1/completions")
        messages = [template_message(m) for m in body.messages]
        kwargs = template_kwargs(state, body)
        try:
            tools, parse_tools = request_tools(body, state.auto_tool_choice)
        except InvalidParam as e:
            raise ApiError(400, str(e), e.param) from None
        if tools is not None:
            kwargs["tools"] = tools
        try:  # on a prompt worker thread: a slow template holds up neither the event loop nor the batch
            prompt = await state.engine.prompts.render(messages, body.add_generation_prompt, kwargs)
        except Exception as e:  # a template may raise on unexpected roles or content
            raise ApiError(400, f"the chat template rejected these messages: {e}", "messages") from None
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        parsers = choice_parsers(state.reasoning_parser, state.tool_call_parser, prompt, body, tools, parse_tools)
        params = make_params(body, logprobs, state)
        try:  # after the thinking; tool_choice "required"... On a prompt worker thread: many tools' grammar takes seconds to make
            await state.engine.prompts.run(lambda _: constrain(body, tools, prompt, params, state.reasoning_parser), large=bool(tools))
        except InvalidParam as e:
            raise ApiError(400, str(e), e.param) from None
        return await respond(state, body, lora, [prompt], params, chat=True, request=request, parsers=parsers)

    # The body's schema takes tools and reasoning in the history only where their parsers run (server/agent_protocol.py).
    chat.__annotations__["body"] = chat_request_class(state.tool_call_parser is not None, state.reasoning_parser is not None)
    app.post("/v1/chat/completions")(chat)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest):
        if state.lora_root is None:
            raise ApiError(403, "runtime adapter loading is off; start the server with --allow-runtime-lora --lora-root DIR")
        name = body.lora_name
        if not ADAPTER_NAME.fullmatch(name):
            raise ApiError(400, f"lora_name must be {ADAPTER_NAME_RULE}", "lora_name")
        if name in state.adapters or name in state.served_names:
            raise ApiError(400, f"an adapter named '{name}' is already loaded; unload it first", "lora_name")
        if name in state.loading:
            raise ApiError(400, f"an adapter named '{name}' is being loaded by another request", "lora_name")
        path = inside_root(state.lora_root, body.lora_path)
        request = LoRARequest(name, next(state.ids), str(path))
        state.loading.add(name)  # no await between the checks above and this: one load of a name at a time
        try:
            await state.engine.load_adapter(request)
        except (AdapterError, ValueError) as e:
            raise ApiError(400, str(e), "lora_path") from None
        except Unavailable as e:
            raise ApiError(503, str(e)) from None
        finally:
            state.loading.discard(name)
        state.adapters[name] = request
        return PlainTextResponse(f"adapter '{name}' loaded")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest):
        if state.lora_root is None:
            raise ApiError(403, "runtime adapter unloading is off; start the server with --allow-runtime-lora --lora-root DIR")
        request = state.adapters.pop(body.lora_name, None)
        if request is None:
            raise ApiError(404, f"no adapter named '{body.lora_name}' is loaded", "lora_name")
        # Requests already running with it finish with it; new requests for the name get 404.
        try:
            await state.engine.call(lambda: state.engine.engine.lora.remove(request.lora_int_id))
        except Unavailable as e:
            raise ApiError(503, str(e)) from None
        return PlainTextResponse(f"adapter '{body.lora_name}' unloaded")

    return app


class Guard:
    """Pure ASGI middleware (it leaves streaming and disconnect detection alone), before any route: the API
    key (401), a server that takes no requests now (503: its engine failed, or it is shutting down), and
    the body-size bound (413, from Content-Length or while reading, before the body is parsed)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state, headers = self.state, Headers(scope=scope)
        if scope["path"].startswith("/v1/"):
            if state.api_key and headers.get("authorization") != f"Bearer {state.api_key}":
                return await _reply(scope, receive, send, 401, "missing or wrong API key (Authorization: Bearer KEY)")
            if (refusing := state.engine.refusing) is not None:
                return await _reply(scope, receive, send, 503, str(refusing))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = state.max_request_bytes
        too_big = f"the request body is larger than this server takes ({limit} bytes, --max-request-bytes)"
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _reply(scope, receive, send, 413, too_big)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await _reply(scope, receive, send, 413, too_big)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        chunks.clear()

        async def replay():
            nonlocal body
            if body is not None:
                message, body = {"type": "http.request", "body": body, "more_body": False}, None
                return message
            return await receive()  # then the client's disconnect

        return await self.app(scope, replay, send)


async def _reply(scope, receive, send, status: int, message: str) -> None:
    await JSONResponse(error_body(message, ERROR_TYPES[status], status), status_code=status)(scope, receive, send)


def template_kwargs(state: ServerState, body) -> dict:
    """The request's chat_template_kwargs; a chat template of its own only with --trust-request-chat-template
    (rendering a template runs the client's code: a tiny one can loop for minutes)."""
    kwargs = dict(body.chat_template_kwargs or {})
    if getattr(body, "chat_template", None) is not None:
        kwargs["chat_template"] = body.chat_template
    if "chat_template" in kwargs and not state.trust_request_chat_template:
        param = "chat_template" if getattr(body, "chat_template", None) is not None else "chat_template_kwargs.chat_template"
        raise ApiError(400, "this server renders only its own chat template; a request's chat_template needs a server "
                            "started with --trust-request-chat-template", param)
    return kwargs


def resolve_model(state: ServerState, name: str) -> LoRARequest | None:
    if name in state.served_names:
        return None
    if name in state.adapters:
        return state.adapters[name]
    raise ApiError(404, f"model '{name}' does not exist; GET /v1/models lists the base model and loaded adapters", "model")


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")  # what loading opens


def inside_root(root: Path, path: str) -> Path:
    """The adapter folder, which must resolve (symlinks followed, '..' applied) to a place inside the root,
    and so must each file in it that loading opens (a file may be a symlink too)."""
    resolved = Path(os.path.realpath(root / path))
    outside = [path] if os.path.commonpath([resolved, root]) != str(root) else [
        f"{path}/{name}" for name in ADAPTER_FILES
        if os.path.lexists(resolved / name) and os.path.commonpath([os.path.realpath(resolved / name), root]) != str(root)
    ]
    if outside:
        raise ApiError(403, f"lora_path '{outside[0]}' is outside the server's --lora-root", "lora_path")
    return resolved


def split_prompts(prompt) -> list[str | dict]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": list(prompt)}]
    if not prompt:
        raise ApiError(400, "prompt is empty", "prompt")
    return [p if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in prompt]


def make_params(body, logprobs: int | None, state: ServerState):
    engine = state.engine.engine
    try:
        return body.sampling_params(logprobs, default_max_tokens=16 if isinstance(body, CompletionRequest) else engine.max_model_len,
                                    model_defaults=engine.default_sampling)
    except ValueError as e:  # hylo.sampling.InvalidParam names the field
        raise ApiError(400, str(e).removeprefix("SamplingParams."), getattr(e, "param", None)) from None


def constraint_error(body, e: InvalidParam) -> ApiError:
    """A constraint that cannot be compiled, named as the request gave it: its own field (guided_json,
    response_format...), or `tools` for the grammar that tool_choice made."""
    field = body.constraint_field(e.param) if body.structured() is not None else "tools"
    return ApiError(400, str(e).replace(e.param, field, 1), field)


async def respond(state: ServerState, body, lora, prompts, params, chat: bool, request: Request | None = None, parsers=None):
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    try:
        # Every prompt tokenized (on prompt worker threads) and checked against max_model_len first: a long
        # prompt is refused before the engine, and before any other prompt of the request starts.
        # The constraint (structured outputs, tool_choice) compiles meanwhile, on a worker thread: a bad one is a 400 too.
        compiling = state.engine.engine.compile_grammar(params)
        compiled = [asyncio.wrap_future(compiling)] if compiling is not None else []
        prompts = (await until_gone(request, asyncio.gather(*(state.engine.prompts.prepare(p) for p in prompts), *compiled)))[: len(prompts)]
        streams = [state.engine.generate(f"{request_id}-{i}", p, params, lora) for i, p in enumerate(prompts)]
        merged = merge(streams)
        # Validation errors surface here, before any byte is sent; a client gone meanwhile aborts its requests.
        first = await until_gone(request, anext(merged))
    except ClientGone:
        return Response(status_code=499)  # nobody reads it
    except Unavailable as e:  # the engine failed, or the server is shutting down
        raise ApiError(503, str(e)) from None
    except InvalidParam as e:  # the engine's checks of a request (prompt, logprobs, stop_token_ids, n) name the field
        if e.param.startswith("structured_outputs"):
            raise constraint_error(body, e) from None
        raise ApiError(400, str(e).removeprefix("SamplingParams."), e.param) from None
    except AdapterError as e:  # the adapter that `model` names cannot be used
        raise ApiError(400, str(e), "model") from None
    except ValueError as e:  # an engine check that does not raise InvalidParam yet: those are about the prompt
        raise ApiError(400, str(e), "prompt" if "prompt" in str(e) or "max_model_len" in str(e) else None) from None
    except Overloaded as e:
        raise ApiError(503, str(e)) from None
    except StopAsyncIteration:
        raise ApiError(500, "no output") from None
    if state.log_requests:
        log_received(request_id, "chat" if chat else "completions", body.model, prompts, params)
    # The base model is reported by its first --served-model-name, whichever of its names the request used (as vLLM).
    reported = state.served_name if lora is None else body.model
    view = Responder(request_id, reported, chat, params, parsers, log_requests=state.log_requests, echo=getattr(body, "echo", False),
                     echo_only=getattr(body, "echo_only", False), tokenizer=state.engine.engine.tokenizer,
                     prompt_logprobs=body.prompt_logprobs is not None)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(view.sse(first, merged, include_usage), media_type="text/event-stream")
    try:
        finals = await until_gone(request, collect(first, merged))
    except ClientGone:
        return Response(status_code=499)
    except RequestFailed as e:
        raise ApiError(500, f"the request failed: {e}") from None
    except (Unavailable, Overloaded) as e:  # Overloaded: another prompt of a request with several was not admitted
        raise ApiError(503, str(e)) from None
    except (ValueError, AdapterError) as e:  # another prompt of the request was refused
        raise ApiError(400, str(e).removeprefix("SamplingParams."), getattr(e, "param", None)) from None
    return view.whole([finals[i] for i in range(len(prompts))])


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


class RequestFailed(Exception):
    """The engine finished the request with an error (RequestOutput.error); the rest of the batch goes on."""


async def until_gone(request: Request | None, awaitable):
    """Await `awaitable` unless the client disconnects first: then it is cancelled (closing the request
    streams inside it aborts their engine requests, freeing their KV blocks and slots) and ClientGone raised."""
    task = asyncio.ensure_future(awaitable)
    if request is None:
        return await task

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone()
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


async def collect(first, merged) -> dict:
    """Every prompt's final RequestOutput, by prompt index; RequestFailed for the first that failed."""
    finals = {}
    item = first
    try:
        while item is not None:
            index, out = item
            if out.error is not None:
                raise RequestFailed(out.error)
            finals[index] = out
            item = await anext(merged, None)
    finally:
        await merged.aclose()  # after a failure: abort the request's other prompts
    return finals


async def merge(streams):
    """(prompt index, RequestOutput) from several request streams as they come; closing it aborts them all."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as e:
            await queue.put((i, e))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        done = 0
        while done < len(streams):
            i, item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse_error(status: int, message: str, param: str | None = None) -> str:
    """An error in the middle of a stream, in OpenAI's shape (the openai client raises it as APIError)."""
    return f"data: {json.dumps(error_body(message, ERROR_TYPES[status], status, param))}\n\n"


class Responder:
    """Shapes RequestOutputs as OpenAI completion / chat responses and SSE chunks."""

    def __init__(self, request_id: str, model: str, chat: bool, params, parsers: Callable[[], ChatOutputParser] | None = None,
                 log_requests: bool = False, echo: bool = False, echo_only: bool = False, tokenizer=None, prompt_logprobs: bool = False):
        self.id, self.model, self.chat, self.params = request_id, model, chat, params
        self.created = int(time.time())
        self.started, self.log_requests = time.monotonic(), log_requests
        # Completions' echo: each choice starts with the prompt (its logprobs first, with logprobs); echo_only (max_tokens
        # 0): the prompt alone. `prompt_logprobs`: vLLM's field of that name is in the response.
        self.echo, self.echo_only, self.tokenizer, self.prompt_logprobs = echo, echo_only, tokenizer, prompt_logprobs
        self.echoed: set[int] = set()  # streamed choices whose prompt went out
        self.n = params.n
        self.sent: dict[int, int] = {}  # choice index → characters already streamed
        self.sent_tokens: dict[int, int] = {}
        # Chat with --reasoning-parser / tool calls: each choice's text goes through a parser of its own.
        self.parsers = parsers if chat else None
        self.parsing: dict[int, ChatOutputParser] = {}
        # A stop string may still complete: hold back that many characters until the choice finishes.
        self.hold = max((len(s) for s in params.stop), default=1) - 1

    def _choice_index(self, prompt_index: int, child: int) -> int:
        return prompt_index * self.n + child

    def _usage(self, outs: list[RequestOutput]) -> dict:
        prompt = sum(len(o.prompt_token_ids) for o in outs)
        completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def whole(self, outs: list[RequestOutput]) -> dict:
        choices = []
        for p, out in enumerate(outs):
            for c in out.outputs:
                choice = {"index": self._choice_index(p, c.index), "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                if self.chat:
                    choice["message"] = {"role": "assistant", "content": c.text}
                    if self.parsers is not None:
                        parser = self.parsers()
                        parser.feed(c.text, final=True)
                        choice["message"].update(parser.message())
                        choice["finish_reason"] = self._finish_reason(parser, c.finish_reason)
                    choice["logprobs"] = self._chat_logprobs(c.logprobs) if c.logprobs is not None else None
                else:
                    prompt_text, prompt_entries = self._echo(out, c)
                    choice["text"] = prompt_text + ("" if self.echo_only else c.text)
                    entries = None if c.logprobs is None else prompt_entries + ([] if self.echo_only else c.logprobs)
                    choice["logprobs"] = self._completion_logprobs(entries, out.prompt_token_ids[0]) if entries is not None else None
                    if self.prompt_logprobs:
                        choice["prompt_logprobs"] = self._prompt_logprobs(out.prompt_logprobs)
                choices.append(choice)
        kind = "chat.completion" if self.chat else "text_completion"
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices, "usage": self._usage(outs)}
        if self.chat and self.prompt_logprobs:
            body["prompt_logprobs"] = self._prompt_logprobs(outs[0].prompt_logprobs)
        if self.log_requests:
            log_finished(self.id, outs, time.monotonic() - self.started)
        return body

    async def sse(self, first, rest, include_usage: bool):
        finals: dict[int, RequestOutput] = {}
        try:
            if self.chat:
                for child in range(self.n):
                    yield self._event([{"index": child, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            item = first
            while item is not None:
                p, out = item
                finals[p] = out
                choices = [ch for c in out.outputs if (ch := self._delta(p, c, out)) is not None]
                if choices:
                    yield self._event(choices)
                if out.error is not None:  # this request failed on its own: an error event, then [DONE]
                    yield sse_error(500, f"the request failed: {out.error}")
                    yield "data: [DONE]\n\n"
                    return
                item = await anext(rest, None)
            if include_usage:
                yield self._event([], usage=self._usage([finals[i] for i in sorted(finals)]))
            yield "data: [DONE]\n\n"
            if self.log_requests:
                log_finished(self.id, [finals[i] for i in sorted(finals)], time.monotonic() - self.started)
        except (Unavailable, Overloaded) as e:  # the engine failed, or the server is shutting down
            yield sse_error(503, str(e))
            yield "data: [DONE]\n\n"
        except (ValueError, AdapterError) as e:  # another prompt of a request with several was refused
            yield sse_error(400, str(e).removeprefix("SamplingParams."), getattr(e, "param", None))
            yield "data: [DONE]\n\n"
        except Exception as e:  # never a stream cut off without a word
            log.exception("stream %s failed", self.id)
            yield sse_error(500, f"internal error ({type(e).__name__}: {e})")
            yield "data: [DONE]\n\n"
        finally:
            await rest.aclose()  # a client gone mid-stream: abort its requests, free their blocks and slots

    def _delta(self, p: int, c, out: RequestOutput) -> dict | None:
        index = self._choice_index(p, c.index)
        finished = c.finish_reason is not None
        upto = len(c.text) if finished else max(self.sent.get(index, 0), len(c.text) - self.hold)
        text = c.text[self.sent.get(index, 0) : upto]
        tokens_from = self.sent_tokens.get(index, 0)
        echoing = self.echo and index not in self.echoed  # the choice's first chunk carries the prompt
        echo_text, echo_entries = self._echo(out, c) if echoing else ("", [])
        if self.echo_only:
            text = ""
        if not text and not echoing and not finished:
            return None
        self.echoed.add(index)
        self.sent[index] = upto
        delta = {"content": text} if text else {}
        choice = {"index": index, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        if self.parsers is not None:
            if index not in self.parsing:
                self.parsing[index] = self.parsers()
            parser = self.parsing[index]
            delta = parser.feed(text, final=finished).openai()
            if not delta and not finished:
                return None  # held back by the parser (a tag may be starting); its tokens' logprobs come with the next chunk
            if finished:
                choice["finish_reason"] = self._finish_reason(parser, c.finish_reason)
        self.sent_tokens[index] = len(c.token_ids)
        new_logprobs = c.logprobs[tokens_from:] if c.logprobs is not None else None
        if self.chat:
            choice["delta"] = delta
            choice["logprobs"] = self._chat_logprobs(new_logprobs) if new_logprobs is not None else None
        else:
            choice["text"] = echo_text + text
            entries = None if new_logprobs is None else echo_entries + ([] if self.echo_only else new_logprobs)
            choice["logprobs"] = self._completion_logprobs(entries, out.prompt_token_ids[0]) if entries is not None else None
        return choice

    def _echo(self, out: RequestOutput, c) -> tuple[str, list]:
        """Completions with echo: the prompt's text (token-id prompts decoded) and, where the choice has logprobs,
        the prompt's entries (None for its first token); ("", []) without echo."""
        if not self.echo:
            return "", []
        text = out.prompt if out.prompt is not None else (self.tokenizer.decode(out.prompt_token_ids) if self.tokenizer else "")
        return text, list(out.prompt_logprobs or []) if c.logprobs is not None else []

    @staticmethod
    def _finish_reason(parser: ChatOutputParser, reason: str | None) -> str | None:
        """"tool_calls" when the model ended its turn with tool calls; a call cut short stays "length" (as the others)."""
        return "tool_calls" if reason == "stop" and parser.called else reason

    def _event(self, choices: list[dict], usage: dict | None = None) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def _completion_logprobs(self, entries, first_prompt_token: int | None = None) -> dict:
        """OpenAI's completion logprobs; an entry None is the echoed prompt's first token (nothing predicts it):
        its logprob and top_logprobs are null, as in OpenAI's and vLLM's echo."""
        first = self.tokenizer.decode([first_prompt_token]) if self.tokenizer and first_prompt_token is not None else None
        sampled = [None if entry is None else next(iter(entry.values())) for entry in entries]  # the sampled token first
        return {
            "tokens": [first if lp is None else lp.decoded_token for lp in sampled],
            "token_logprobs": [None if lp is None else _finite(lp.logprob) for lp in sampled],
            "top_logprobs": [None if entry is None else {lp.decoded_token: _finite(lp.logprob) for lp in entry.values()} for entry in entries],
        }

    @staticmethod
    def _prompt_logprobs(entries) -> list | None:
        """vLLM's prompt_logprobs: null for the first prompt token, then {token id: {logprob, rank, decoded_token}}."""
        if entries is None:
            return None
        return [None if entry is None else {str(t): {"logprob": _finite(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
                                            for t, lp in entry.items()} for entry in entries]

    def _chat_logprobs(self, entries) -> dict:
        def item(lp) -> dict:
            return {"token": lp.decoded_token, "logprob": lp.logprob, "bytes": list((lp.decoded_token or "").encode())}

        content = []
        for entry in entries:
            top = sorted(entry.values(), key=lambda x: x.rank)[: self.params.logprobs or 0]
            content.append({**item(next(iter(entry.values()))), "top_logprobs": [item(t) for t in top]})
        return {"content": content}


def _finite(logprob: float) -> float:
    """-inf (a token the model rules out) as vLLM writes it: JSON has no infinity."""
    return max(logprob, -9999.0)

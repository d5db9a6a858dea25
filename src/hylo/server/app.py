"""The OpenAI-compatible HTTP API: routes, errors in OpenAI's shape, SSE streaming, runtime adapters."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from hylo.lora.peft_config import AdapterError
from hylo.lora.request import LoRARequest
from hylo.outputs import RequestOutput
from hylo.server.async_engine import AsyncEngine, Overloaded
from hylo.server.protocol import ChatRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest, error_body


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error", 503: "overloaded_error"}


@dataclass
class ServerState:
    engine: AsyncEngine
    served_name: str
    model_path: str
    api_key: str | None = None
    lora_root: Path | None = None  # runtime adapter loading is allowed only when set
    adapters: dict[str, LoRARequest] = field(default_factory=dict)
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_):
        yield
        # Graceful shutdown (SIGTERM, Ctrl-C): in-flight streams have closed; stop the engine and its workers.
        await asyncio.to_thread(state.engine.stop)

    app = FastAPI(title="hylo", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(error_body(e.message, KINDS.get(e.status, "error"), e.status, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        first = e.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"{param or 'body'}: {first.get('msg')}", KINDS[400], 400, param), status_code=400)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if state.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {state.api_key}":
                return JSONResponse(error_body("missing or wrong API key (Authorization: Bearer KEY)", KINDS[401], 401), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        if state.engine.failed:
            return JSONResponse({"status": "failed", "reason": state.engine.failed}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [{"id": state.served_name, "object": "model", "created": created, "owned_by": "hylo", "root": state.model_path, "parent": None}]
        data += [
            {"id": name, "object": "model", "created": created, "owned_by": "hylo", "root": r.lora_path, "parent": state.served_name}
            for name, r in state.adapters.items()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        lora = resolve_model(state, body.model)
        prompts = split_prompts(body.prompt)
        params = make_params(body, body.logprobs, state)
        return await respond(state, body, lora, prompts, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        lora = resolve_model(state, body.model)
        tokenizer = state.engine.engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template; use /v1/completions")
        messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
        try:
            prompt = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=body.add_generation_prompt, **(body.chat_template_kwargs or {})
            )
        except Exception as e:  # a template may raise on unexpected roles or content
            raise ApiError(400, f"the chat template rejected these messages: {e}", "messages") from None
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await respond(state, body, lora, [prompt], make_params(body, logprobs, state), chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest):
        if state.lora_root is None:
            raise ApiError(403, "runtime adapter loading is off; start the server with --allow-runtime-lora --lora-root DIR")
        if body.lora_name in state.adapters or body.lora_name == state.served_name:
            raise ApiError(400, f"an adapter named '{body.lora_name}' is already loaded; unload it first", "lora_name")
        path = inside_root(state.lora_root, body.lora_path)
        request = LoRARequest(body.lora_name, next(state.ids), str(path))
        try:
            await state.engine.call(lambda: state.engine.engine.add_lora(request))
        except (AdapterError, ValueError) as e:
            raise ApiError(400, str(e), "lora_path") from None
        state.adapters[body.lora_name] = request
        return PlainTextResponse(f"adapter '{body.lora_name}' loaded")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest):
        if state.lora_root is None:
            raise ApiError(403, "runtime adapter unloading is off; start the server with --allow-runtime-lora --lora-root DIR")
        request = state.adapters.pop(body.lora_name, None)
        if request is None:
            raise ApiError(404, f"no adapter named '{body.lora_name}' is loaded", "lora_name")
        # Requests already running with it finish with it; new requests for the name get 404.
        await state.engine.call(lambda: state.engine.engine.lora.remove(request.lora_int_id))
        return PlainTextResponse(f"adapter '{body.lora_name}' unloaded")

    return app


def _text(content: str | list[dict] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def resolve_model(state: ServerState, name: str) -> LoRARequest | None:
    if name == state.served_name:
        return None
    if name in state.adapters:
        return state.adapters[name]
    raise ApiError(404, f"model '{name}' does not exist; GET /v1/models lists the base model and loaded adapters", "model")


def inside_root(root: Path, path: str) -> Path:
    """The adapter folder, which must resolve (symlinks followed, '..' applied) to a place inside the root."""
    resolved = Path(os.path.realpath(root / path))
    if os.path.commonpath([resolved, root]) != str(root):
        raise ApiError(403, f"lora_path '{path}' is outside the server's --lora-root", "lora_path")
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
    try:
        return body.sampling_params(logprobs, default_max_tokens=16 if isinstance(body, CompletionRequest) else state.engine.engine.max_model_len)
    except ValueError as e:
        param = str(e).split("=")[0].removeprefix("SamplingParams.") if str(e).startswith("SamplingParams.") else None
        raise ApiError(400, str(e), param) from None


async def respond(state: ServerState, body, lora, prompts, params, chat: bool):
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    streams = [state.engine.generate(f"{request_id}-{i}", p, params, lora) for i, p in enumerate(prompts)]
    merged = merge(streams)
    try:
        first = await anext(merged)  # validation errors surface here, before any byte is sent
    except (ValueError, AdapterError) as e:
        raise ApiError(400, str(e), "prompt" if "prompt" in str(e) or "max_model_len" in str(e) else None) from None
    except Overloaded as e:
        raise ApiError(503, str(e)) from None
    except StopAsyncIteration:
        raise ApiError(500, "no output") from None
    view = Responder(request_id, body.model, chat, params)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(view.sse(first, merged, include_usage), media_type="text/event-stream")
    finals = {}
    index, out = first
    finals[index] = out
    async for index, out in merged:
        finals[index] = out
    return view.whole([finals[i] for i in range(len(prompts))])


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


class Responder:
    """Shapes RequestOutputs as OpenAI completion / chat responses and SSE chunks."""

    def __init__(self, request_id: str, model: str, chat: bool, params):
        self.id, self.model, self.chat, self.params = request_id, model, chat, params
        self.created = int(time.time())
        self.n = params.n
        self.sent: dict[int, int] = {}  # choice index → characters already streamed
        self.sent_tokens: dict[int, int] = {}
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
                    choice["logprobs"] = self._chat_logprobs(c.logprobs) if c.logprobs is not None else None
                else:
                    choice["text"] = c.text
                    choice["logprobs"] = self._completion_logprobs(c.logprobs) if c.logprobs is not None else None
                choices.append(choice)
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices, "usage": self._usage(outs)}

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
                choices = [ch for c in out.outputs if (ch := self._delta(p, c)) is not None]
                if choices:
                    yield self._event(choices)
                item = await anext(rest, None)
            if include_usage:
                yield self._event([], usage=self._usage([finals[i] for i in sorted(finals)]))
            yield "data: [DONE]\n\n"
        finally:
            await rest.aclose()  # a client gone mid-stream: abort its requests, free their blocks and slots

    def _delta(self, p: int, c) -> dict | None:
        index = self._choice_index(p, c.index)
        finished = c.finish_reason is not None
        upto = len(c.text) if finished else max(self.sent.get(index, 0), len(c.text) - self.hold)
        text = c.text[self.sent.get(index, 0) : upto]
        tokens_from = self.sent_tokens.get(index, 0)
        if not text and not finished:
            return None
        self.sent[index] = upto
        self.sent_tokens[index] = len(c.token_ids)
        choice = {"index": index, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        new_logprobs = c.logprobs[tokens_from:] if c.logprobs is not None else None
        if self.chat:
            choice["delta"] = {"content": text} if text else {}
            choice["logprobs"] = self._chat_logprobs(new_logprobs) if new_logprobs is not None else None
        else:
            choice["text"] = text
            choice["logprobs"] = self._completion_logprobs(new_logprobs) if new_logprobs is not None else None
        return choice

    def _event(self, choices: list[dict], usage: dict | None = None) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def _completion_logprobs(self, entries) -> dict:
        sampled = [next(iter(entry.values())) for entry in entries]  # the sampled token comes first in each entry
        return {
            "tokens": [lp.decoded_token for lp in sampled],
            "token_logprobs": [lp.logprob for lp in sampled],
            "top_logprobs": [{lp.decoded_token: lp.logprob for lp in entry.values()} for entry in entries],
        }

    def _chat_logprobs(self, entries) -> dict:
        def item(lp) -> dict:
            return {"token": lp.decoded_token, "logprob": lp.logprob, "bytes": list((lp.decoded_token or "").encode())}

        content = []
        for entry in entries:
            top = sorted(entry.values(), key=lambda x: x.rank)[: self.params.logprobs or 0]
            content.append({**item(next(iter(entry.values()))), "top_logprobs": [item(t) for t in top]})
        return {"content": content}

"""The engine in its own thread, so that HTTP requests join the running batch (continuous batching).

All engine access happens on the engine thread: the server submits commands (add, abort, load,
unload) and gets futures back; each request's outputs arrive on an asyncio queue of its own.
Prompts are tokenized and chat templates rendered before that, on worker threads of their own
(`PromptWorkers`), so that neither the batch nor the event loop waits for a long prompt.

Failure: a request that fails on its own finishes with `RequestOutput.error` set and the batch goes
on. If the engine itself cannot go on (`step()` raises, a tensor-parallel worker died), every
request fails at once with `EngineFailed`, every later one is refused, and `on_failure` is called
(the server then exits non-zero so that a supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import copy
import ctypes
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from hylo.engine.engine import READ_POLL_SECONDS, LLMEngine
from hylo.lora.peft_config import AdapterError
from hylo.lora.request import LoRARequest
from hylo.outputs import RequestOutput
from hylo.sampling import InvalidParam, SamplingParams
from hylo.server.metrics import Metrics

log = logging.getLogger("hylo")


class Overloaded(Exception):
    """More sequences would wait than the server's queue limit allows."""


class Unavailable(Exception):
    """The server cannot take or finish requests: its engine failed, or it is shutting down."""


class EngineFailed(Unavailable):
    pass


class ShuttingDown(Unavailable):
    pass


@dataclass
class Stream:
    """One request's outputs, delivered to the event loop that asked for them."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    adapter: str = "base"
    arrived: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None
    tokens: int = 0


LARGE = 1 << 20  # characters (or token ids) of a prompt after which its worker gives memory back to the system


def _trim_memory() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PromptWorkers:
    """Tokenizes prompts and renders chat templates on daemon threads, each with its own copy of the
    tokenizer (HF fast tokenizers must not be shared across threads). Daemon threads: a template that
    runs for long never holds up the process's exit."""

    def __init__(self, tokenizer, max_model_len: int, threads: int = 2):
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        # A token covers at most this many characters (bytes, for byte-level BPE): a prompt of
        # `max_token_chars * max_model_len * 4` characters cannot fit (4 leaves room for normalizers).
        self.max_token_chars = max((len(t) for t in tokenizer.get_vocab()), default=1) if tokenizer is not None else 1
        for i in range(threads if tokenizer is not None else 0):
            threading.Thread(target=self._work, args=(copy.deepcopy(tokenizer),), name=f"hylo-prompts-{i}", daemon=True).start()

    def _work(self, tokenizer) -> None:
        while True:
            fn, future = self.jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            result = None
            try:
                result = fn(tokenizer)
                future.set_result(result)
            except BaseException as e:
                future.set_exception(e)
            if isinstance(result, (str, list)) and len(result) > LARGE or getattr(fn, "large", False):
                del result
                _trim_memory()  # a worker thread's malloc arena keeps a big prompt's memory otherwise

    async def run(self, fn: Callable[[Any], Any], large: bool = False) -> Any:
        """`fn(tokenizer)` on a worker thread."""
        future: Future = Future()
        fn.large = large
        self.jobs.put((fn, future))
        return await asyncio.wrap_future(future)

    def _too_long(self, n: int, at_least: bool = False) -> InvalidParam:
        has = f"at least {n}" if at_least else str(n)
        return InvalidParam("prompt", f"the prompt has {has} tokens, but max_model_len is {self.max_model_len}; shorten it")

    async def prepare(self, prompt: str | dict) -> str | dict:
        """Text → {"prompt": text, "prompt_token_ids": ids}; a prompt that cannot fit is refused here (InvalidParam)."""
        if isinstance(prompt, dict):
            ids = prompt.get("prompt_token_ids")
            if isinstance(ids, (list, tuple)) and len(ids) >= self.max_model_len:
                raise self._too_long(len(ids))
            return prompt
        if not isinstance(prompt, str) or self.tokenizer is None:
            return prompt  # the engine says what is wrong with it
        least = len(prompt) // (4 * self.max_token_chars)
        if least >= self.max_model_len:
            raise self._too_long(least, at_least=True)
        ids = await self.run(lambda tok: tok.encode(prompt, add_special_tokens=False), large=len(prompt) > LARGE)
        if len(ids) >= self.max_model_len:
            raise self._too_long(len(ids))
        return {"prompt": prompt, "prompt_token_ids": ids}

    async def render(self, messages: list[dict], add_generation_prompt: bool, kwargs: dict) -> str:
        return await self.run(lambda tok: tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs))


class AsyncEngine:
    def __init__(
        self, engine: LLMEngine, max_waiting: int, metrics: Metrics, on_failure: Callable[[str], None] | None = None,
        prompt_threads: int = 2,
    ):
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.on_failure = on_failure
        self.prompts = PromptWorkers(engine.tokenizer, engine.max_model_len, prompt_threads)
        self.commands: queue.Queue[tuple[Callable, Future]] = queue.Queue()
        self.streams: dict[str, Stream] = {}
        self.wake = threading.Event()
        self.lock = threading.Lock()  # orders "the engine thread has exited" against new commands
        self.exited = False
        self.stopping = False
        self.failed: str | None = None  # why the engine failed
        self.closing: str | None = None  # why new requests are refused (shutting down)
        self.thread = threading.Thread(target=self._run, name="hylo-engine", daemon=True)
        self.thread.start()

    @property
    def refusing(self) -> Unavailable | None:
        """The error for a new request, if the server takes none now."""
        if self.failed:
            return EngineFailed(f"the engine failed ({self.failed}); the server is exiting to be restarted")
        if self.closing:
            return ShuttingDown(self.closing)
        return None

    # -- called from the event loop -----------------------------------------------------------------

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread; its result, or its exception raised here (Unavailable once it has stopped)."""
        future: Future = Future()
        with self.lock:
            if self.exited:
                raise self.refusing or ShuttingDown("the server is shutting down")
            self.commands.put((fn, future))
        self.wake.set()
        return await asyncio.wrap_future(future)

    async def load_adapter(self, request: LoRARequest) -> None:
        """Read and validate an adapter on every rank while the batch keeps running; AdapterError if refused."""
        read: Future = Future()

        def done(why: str | None) -> None:
            if why is None:
                read.set_result(None)
            else:
                read.set_exception(AdapterError(why))

        await self.call(lambda: self.engine.start_lora(request, done))
        await asyncio.wrap_future(read)

    def check_holds(self, sequences: int, prompts: int = 1) -> None:
        """InvalidParam if a request of `prompts` prompts, `sequences` sequences in all, could never be admitted
        (not even on an idle server): a 400 then, not a 503 that asks the client to retry forever."""
        scheduler = self.engine.scheduler
        if sequences > self.max_waiting + scheduler.max_num_seqs:
            what = f"{prompts} prompts x n={sequences // prompts}" if prompts > 1 else f"n={sequences}"
            raise InvalidParam("prompt" if prompts > 1 else "n", f"{what} is more sequences than this server holds at once "
                                                                 f"({scheduler.max_num_seqs} running + {self.max_waiting} waiting)")

    async def generate(self, request_id: str, prompt: str | dict, params: SamplingParams, lora: LoRARequest | None):
        """Yield RequestOutputs (cumulative) until the request finishes; aborts it if the caller goes away.

        The prompt is tokenized first (off the engine thread and the event loop); then the request is
        admitted if its sequences (n) fit: those waiting plus these may not pass --max-waiting plus what
        the scheduler can start at once (free state slots, max_num_seqs headroom)."""
        if self.refusing:
            raise self.refusing
        stream = Stream(asyncio.get_running_loop(), adapter=lora.lora_name if lora else "base")
        prompt = await self.prompts.prepare(prompt)

        def add() -> None:
            if self.refusing:
                raise self.refusing
            scheduler, n = self.engine.scheduler, params.n
            if n <= getattr(self.engine.config, "max_n", n):  # a larger n is the engine's InvalidParam
                self.check_holds(n)
                waiting = len(scheduler.waiting)
                startable = max(0, min(scheduler.slots.num_free, scheduler.max_num_seqs - len(scheduler.running)))
                if waiting + n > self.max_waiting + startable:
                    raise Overloaded(f"{waiting} sequences are already waiting and this request adds {n}; "
                                     f"the server queues at most {self.max_waiting}; retry later")
            self.engine.add_request(request_id, prompt, params, lora)
            self.streams[request_id] = stream

        finished = False
        try:
            await self.call(add)  # inside the try: a caller gone while it is queued still aborts it
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    finished = True  # already out of the engine
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                # No await here: a disconnected client's task is cancelled, and every await would be too.
                with self.lock:
                    if not self.exited:
                        self.commands.put((lambda: self._abort(request_id), Future()))
                self.wake.set()

    def close(self, reason: str = "the server is shutting down") -> None:
        """Shutting down: refuse new requests, and end every running and waiting one with ShuttingDown."""
        if self.closing or self.failed:
            return
        self.closing = reason
        with self.lock:
            if not self.exited:
                self.commands.put((self._end_all, Future()))
        self.wake.set()

    def stop(self) -> None:
        """Abort what is left, stop the engine thread and the engine's workers (safe to call twice)."""
        self.close()
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)
        self.engine.shutdown()

    # -- the engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self.stopping:
                self._drain_commands()
                self.metrics.observe_step(self.engine)  # aborts and adapter changes move the gauges too
                if not self.engine.has_unfinished_requests():
                    dead = self._dead_worker()
                    if dead:
                        self._fail(dead)
                        break
                    reading = self.engine.has_pending_adapter_reads()
                    if reading:
                        self.engine.poll_adapters()
                    self.wake.wait(READ_POLL_SECONDS if reading else 0.5)
                    self.wake.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as e:  # the engine cannot go on (e.g. a tensor-parallel worker died)
                    log.exception("engine step failed")
                    self._fail(str(e))
                    break
                for out in outputs:
                    self._deliver(out.request_id, out)
        except Exception as e:  # a fault outside a step (adapter bookkeeping, delivery): the server must not stay up without it
            log.exception("the engine thread failed")
            self._fail(f"the engine thread failed: {e!r}")
        finally:
            with self.lock:
                self.exited = True
            self._drain_commands()  # commands queued before the exit still run (aborts) or fail
            if self.failed and self.on_failure is not None:
                self.on_failure(self.failed)

    def _dead_worker(self) -> str | None:
        """Why the engine cannot go on, for a tensor-parallel worker that died while the engine was idle."""
        for rank, proc in enumerate(getattr(getattr(self.engine, "executor", None), "procs", None) or [], start=1):
            if not proc.is_alive():
                return f"tensor-parallel worker rank {rank} exited (code {proc.exitcode})"
        return None

    def _fail(self, reason: str) -> None:
        log.error("the engine failed: %s; failing every request, then exiting", reason)
        self.failed = reason
        for request_id in list(self.streams):
            self._deliver(request_id, self.refusing)

    def _end_all(self) -> None:
        for request_id in list(self.streams):
            self.engine.abort_request(request_id)
            self._deliver(request_id, ShuttingDown(self.closing or "the server is shutting down"), status="aborted")

    def _drain_commands(self) -> None:
        while True:
            try:
                fn, future = self.commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            if self.failed:
                future.set_exception(self.refusing)  # the engine's state is gone: run nothing on it
                continue
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)

    def _deliver(self, request_id: str, item: RequestOutput | Exception, status: str = "error") -> None:
        stream = self.streams.get(request_id)
        if stream is None:
            return
        if isinstance(item, RequestOutput):
            self.metrics.observe_output(stream, item)
            if item.finished:
                del self.streams[request_id]
                self.metrics.finished(stream.adapter, "error" if item.error else "ok")
        else:
            del self.streams[request_id]
            self.metrics.finished(stream.adapter, status)
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _abort(self, request_id: str) -> None:
        stream = self.streams.pop(request_id, None)
        self.engine.abort_request(request_id)
        if stream is not None:
            self.metrics.finished(stream.adapter, "aborted")


def default_prompt_threads() -> int:
    return max(2, min(4, os.cpu_count() or 2))

"""The engine in its own thread, so that HTTP requests join the running batch (continuous batching).

All engine access happens on the engine thread: the server submits commands (add, abort, load,
unload) and gets futures back; each request's outputs arrive on an asyncio queue of its own.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from hylo.engine.engine import LLMEngine
from hylo.lora.request import LoRARequest
from hylo.outputs import RequestOutput
from hylo.sampling import SamplingParams
from hylo.server.metrics import Metrics

log = logging.getLogger("hylo")


class Overloaded(Exception):
    """More requests are waiting than the server's queue limit."""


@dataclass
class Stream:
    """One request's outputs, delivered to the event loop that asked for them."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    adapter: str = "base"
    arrived: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None
    tokens: int = 0


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int, metrics: Metrics):
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.commands: queue.Queue[tuple[Callable, Future]] = queue.Queue()
        self.streams: dict[str, Stream] = {}
        self.wake = threading.Event()
        self.stopping = False
        self.failed: str | None = None
        self.thread = threading.Thread(target=self._run, name="hylo-engine", daemon=True)
        self.thread.start()

    # -- called from the event loop -----------------------------------------------------------------

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread; its result, or its exception raised here."""
        future: Future = Future()
        self.commands.put((fn, future))
        self.wake.set()
        return await asyncio.wrap_future(future)

    async def generate(self, request_id: str, prompt: str | dict, params: SamplingParams, lora: LoRARequest | None):
        """Yield RequestOutputs (cumulative) until the request finishes; aborts it if the caller goes away."""
        stream = Stream(asyncio.get_running_loop(), adapter=lora.lora_name if lora else "base")

        def add() -> None:
            if len(self.engine.scheduler.waiting) >= self.max_waiting:
                raise Overloaded(f"{len(self.engine.scheduler.waiting)} requests are already waiting; retry later")
            self.engine.add_request(request_id, prompt, params, lora)
            self.streams[request_id] = stream

        await self.call(add)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                # No await here: a disconnected client's task is cancelled, and every await would be too.
                self.commands.put((lambda: self._abort(request_id), Future()))
                self.wake.set()

    def stop(self) -> None:
        """Abort what is left, stop the engine thread and the engine's workers (safe to call twice)."""
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)
        self.engine.shutdown()

    # -- the engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self.stopping:
            self._drain_commands()
            self.metrics.observe_step(self.engine)  # aborts and adapter changes move the gauges too
            if not self.engine.has_unfinished_requests():
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # the engine cannot go on (e.g. a tensor-parallel worker died)
                log.exception("engine step failed")
                self.failed = str(e)
                for request_id in list(self.streams):
                    self._deliver(request_id, RuntimeError(f"the engine failed: {e}"))
                self.stopping = True
                break
            for out in outputs:
                self._deliver(out.request_id, out)
        self._fail_pending_commands()

    def _drain_commands(self) -> None:
        while True:
            try:
                fn, future = self.commands.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:
                    future.set_exception(e)

    def _fail_pending_commands(self) -> None:
        while not self.commands.empty():
            _, future = self.commands.get_nowait()
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError(self.failed or "the server is shutting down"))

    def _deliver(self, request_id: str, item: RequestOutput | Exception) -> None:
        stream = self.streams.get(request_id)
        if stream is None:
            return
        if isinstance(item, RequestOutput):
            self.metrics.observe_output(stream, item)
            if item.finished:
                del self.streams[request_id]
                self.metrics.finished(stream.adapter, "ok")
        else:
            del self.streams[request_id]
            self.metrics.finished(stream.adapter, "error")
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _abort(self, request_id: str) -> None:
        stream = self.streams.pop(request_id, None)
        self.engine.abort_request(request_id)
        if stream is not None:
            self.metrics.finished(stream.adapter, "aborted")

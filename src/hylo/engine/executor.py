"""Runs every call on all tensor-parallel ranks in lockstep: rank 0 in this process, ranks 1..N-1 in their own.

The driver posts each step's inputs to the workers through shared memory (`StepChannel`), runs the step
itself, and waits for each worker's acknowledgement there; every other call (a method of `ModelWorker`
and its arguments) goes down one pipe per worker, with a pickled reply. A worker that raises reports
the error; a worker that dies closes its pipe and its collective sockets, and the driver reports it
within seconds. With one rank there are no workers and no communication.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from hylo.batch import StepInput
from hylo.config import ModelConfig
from hylo.distributed import TPGroup, abort_one_shot_all_reduce, can_enable_one_shot_all_reduce, disable_one_shot_all_reduce
from hylo.engine.cache import CachePlan
from hylo.engine.config import EngineConfig
from hylo.engine.cuda_graphs import DecodeGraphs
from hylo.engine.step_channel import PIPE, SHARED_POLL_SECONDS, STEP, StepChannel
from hylo.engine.worker import ModelWorker
from hylo.engine.worker_watch import WorkerWatch

log = logging.getLogger("hylo")
COLLECTIVE_TIMEOUT = timedelta(minutes=5)  # a hung peer fails the step rather than the process
# How long the worker watch leaves NCCL to the driver's own thread after a worker's exit (see _worker_exited).
LEAVE_GRACE_SECONDS = 5.0


class WorkerDied(RuntimeError):
    """A tensor-parallel worker process exited; the engine cannot continue."""


# A dead peer can leave a kernel waiting on this GPU (an NCCL collective until its communicator is aborted, and the abort
# itself was seen to hang; the one-shot all-reduce's waits end on its abort flag), and freeing device memory waits for
# the whole device: an engine that lost a worker keeps its model, caches and buffers here rather than free them and
# hang. A server exits after such a failure.
_keep_after_loss: list = []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_group(rank: int, size: int, port: int, device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)


class _Driver:
    """The driver as a worker's watch sees a process: alive while it is still the worker's parent."""

    exitcode = None

    def __init__(self, pid: int):
        self.pid = pid

    def is_alive(self) -> bool:
        return os.getppid() == self.pid


def _driver_gone(_rank: int, _code: int | None) -> None:
    """The driver exited without stopping this worker (killed mid-step, say): nobody will read this rank's results,
    and a collective of the step may wait on the GPU for ever for the driver's part. The one-shot all-reduce's waits
    end, and so does the process, its GPU memory with it."""
    abort_one_shot_all_reduce()
    os._exit(1)


def _worker_main(conn, channel_name: str, config: EngineConfig, model_config: ModelConfig, rank: int, port: int, device_type: str,
                 dtype: torch.dtype) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; it shuts workers down
    size = config.tensor_parallel_size
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    channel = StepChannel(size - 1, name=channel_name)
    driver = _Driver(os.getppid())
    worker = driver_watch = None
    try:
        conn.send(("ok", None))  # alive: the driver may now join the rendezvous without risking a long wait
        _init_group(rank, size, port, device)
        worker = ModelWorker(config, model_config, TPGroup(rank, size), device, dtype, progress=False)
        driver_watch = WorkerWatch([driver], _driver_gone)  # between steps the wait below notices too
        conn.send(("ok", None))
        while True:
            kind, packed = channel.wait(alive=driver.is_alive, share_gil=worker.reading)
            if kind == 0:
                break  # the driver is gone
            method, args = ("execute", (StepInput.unpack(packed),)) if kind == STEP else conn.recv()
            if method == "shutdown":
                break
            try:
                value = getattr(worker, method)(*args)
            except Exception as e:  # reported to the driver, which raises it
                error = e if _picklable(e) else RuntimeError(traceback.format_exc())
                if method == "execute":
                    channel.acknowledge(rank - 1, ok=False)
                conn.send(("error", error))
                if method == "execute":
                    break  # a failed step leaves the collectives out of step: stop, and the driver reports it
                continue
            if method == "execute":
                channel.acknowledge(rank - 1, ok=True)
            else:
                conn.send(("ok", value))
    except (EOFError, KeyboardInterrupt):
        pass  # the driver is gone
    except Exception as e:
        try:
            conn.send(("error", e if _picklable(e) else RuntimeError(traceback.format_exc())))
        except OSError:
            pass
    finally:
        if driver_watch is not None:
            driver_watch.stop()
        channel.close()
        worker = None  # its graphs and symmetric memory go before the group
        disable_one_shot_all_reduce()
        gc.collect()
        _leave_group()


_group_lock = threading.Lock()  # the driver's thread and its worker watch may both end the group


def _leave_group(graphs: DecodeGraphs | None = None) -> None:
    """Leave the process group without waiting on peers that may be gone or stuck in a collective: NCCL's
    orderly teardown blocks until every rank takes part, so its communicators are aborted first. NCCL's abort also
    waits until no CUDA graph that captured the group's collectives is left (a killed worker's test hung there on two
    H200s: the driver's graphs, kept by `_keep_after_loss` or by a step on another thread), so `graphs` go first."""
    with _group_lock:
        if graphs is not None:
            graphs.destroy()
        if not dist.is_initialized():
            return
        if dist.get_backend() == "nccl":
            dist.distributed_c10d._abort_process_group()  # this also ends the default group
        if dist.is_initialized():
            dist.destroy_process_group()


def _picklable(e: Exception) -> bool:
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return True
    except Exception:
        return False


class Executor:
    def __init__(
        self, config: EngineConfig, model_config: ModelConfig, device: torch.device, dtype: torch.dtype, max_model_len: int, progress: bool
    ):
        self.size = config.tensor_parallel_size
        self.procs: list[mp.Process] = []
        self.conns = []
        self.channel: StepChannel | None = None
        self.dead: str | None = None
        self.lost: tuple[int, int | None] | None = None  # (rank, exit code) of a worker the watch found gone
        self.watch: WorkerWatch | None = None
        self._leaving = threading.Event()  # the driver's thread is stopping the workers and leaving the group
        self.device = device
        try:
            if self.size > 1:
                self._start_workers(config, model_config, device, dtype)
            self.driver = ModelWorker(config, model_config, TPGroup(0, self.size), device, dtype, progress)
            _, errors = self._collect("start-up")
            if errors:
                raise errors[0]
            if self.size > 1 and device.type == "cuda":
                # Before the budget is measured: its buffer is then in use, and the trial graphs take its all-reduces.
                if can_enable_one_shot_all_reduce():
                    self.call("enable_one_shot_all_reduce")
                else:
                    log.info("one-shot all-reduce off: this process already ran a tensor-parallel engine; NCCL does every all-reduce")
            budget = min(self.call("cache_budget", max_model_len))  # each rank measures its own; the plan must fit every one
            self.plan = CachePlan.fit(
                self.driver.shapes, budget, config.block_size, max_model_len, config.max_num_seqs, dtype, config.enable_prefix_caching
            )
            self.call("allocate", self.plan, max_model_len)
            if self.procs:  # from now on; a worker that fails its start-up reports through its pipe and exits
                self.watch = WorkerWatch(self.procs, self._worker_exited)
        except BaseException:
            self.close()
            raise

    def _start_workers(self, config, model_config, device, dtype) -> None:
        port = _free_port()
        ctx = mp.get_context("spawn")
        self.channel = StepChannel(self.size - 1)
        for rank in range(1, self.size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main, args=(child, self.channel.name, config, model_config, rank, port, device.type, dtype), daemon=True,
                name=f"hylo-tp{rank}",
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.size))
        _, errors = self._collect("process start")
        if errors:
            raise errors[0]
        _init_group(0, self.size, port, device)

    def call(self, method: str, *args) -> list:
        """Run `method` on every rank; its return value per rank (rank 0 first). A step's inputs reach the workers
        through the step channel and they acknowledge it there; every other call goes through the pipes."""
        if self.dead:
            raise WorkerDied(self.dead)
        self._raise_if_lost(method)
        if self.conns:
            packed = args[0].pack() if method == "execute" else None
            if packed is not None and self.channel.fits(packed):
                self.channel.post(STEP, packed)
            else:
                self.channel.post(PIPE)
                # A step's sampled tokens (a tensor on the driver's device) stay there: the workers get them by
                # broadcast inside the step (Worker._last_tokens).
                sent = args[:1] if method == "execute" else args
                for conn in self.conns:
                    try:
                        conn.send((method, sent))
                    except OSError:
                        pass  # reported by _collect
        error = None
        try:
            result = getattr(self.driver, method)(*args)
        except Exception as e:
            error, result = e, None
        if error is not None and method == "execute":  # the workers may be waiting in a collective for this rank
            for rank, proc in enumerate(self.procs, start=1):
                proc.join(1)  # a killed peer's sockets close a moment before its exit is visible
                if not proc.is_alive():
                    self._died(rank, proc, "a step")  # the root cause of the driver's failed collective
            self.dead = f"a tensor-parallel step failed: {error}; restart the engine"
            self.shutdown()
            raise error
        values, errors = self._acknowledged() if method == "execute" and self.conns else self._collect(method)
        if errors or error is not None:
            if method == "execute":  # the ranks' collectives are out of step now
                self.dead = f"a tensor-parallel step failed: {errors[0] if errors else error}; restart the engine"
                self.shutdown()
            raise errors[0] if errors else error  # a worker's own error is the root cause
        return [result] + values

    def _acknowledged(self) -> tuple[list, list]:
        """Wait until every worker has run the step just posted (its launches queued); a worker's error follows
        on its pipe."""
        seq, errors = self.channel.seq, []
        pause = SHARED_POLL_SECONDS if self.driver.reading else 0.0  # as the workers' polls: see StepChannel.wait
        for worker, conn in enumerate(self.conns):
            while (ack := self.channel.acknowledged(worker)) not in (seq, -seq):
                if pause:
                    time.sleep(pause)
                self._raise_if_lost("a step")  # the worker watch notices an exit as it happens
            if ack == -seq:
                _, error = conn.recv()
                errors.append(error)
        return [None] * len(self.conns), errors

    def _collect(self, what: str) -> tuple[list, list]:
        """Each worker's reply to the last call; WorkerDied as soon as one is gone."""
        values, errors = [], []
        for rank, (conn, proc) in enumerate(zip(self.conns, self.procs), start=1):
            try:
                while not conn.poll(0.05):
                    if not proc.is_alive() and not conn.poll(0):
                        raise EOFError
                status, value = conn.recv()
            except (EOFError, OSError):
                self._died(rank, proc, what)
            if status == "error":
                errors.append(value)
            values.append(value)
        return values, errors

    def close(self) -> None:
        """Stop the workers and free this process's share too (model, caches, graphs), so that another engine
        can start in the same process; after a worker's death on a GPU, free nothing there (`_keep_after_loss`)."""
        self.dead = self.dead or "the engine has been shut down; start a new one"
        if self.lost and self.device.type == "cuda":
            # Left with the driver still here: its graphs are destroyed before NCCL's abort, which waits for them.
            self.shutdown()
            _keep_after_loss.append((self.__dict__.pop("driver", None), disable_one_shot_all_reduce()))
            return
        # The model, caches and graphs go first: captured collectives and symmetric memory belong to the group.
        driver = self.__dict__.pop("driver", None)
        one_shot = disable_one_shot_all_reduce()
        del driver, one_shot
        gc.collect()  # the model's modules refer to each other (shared LoRA batch, tied weights)
        self.shutdown()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def _raise_if_lost(self, what: str) -> None:
        if self.lost:
            rank = self.lost[0]
            self._died(rank, self.procs[rank - 1], what)

    def _worker_exited(self, rank: int, code: int | None) -> None:
        """The watch's callback, on its thread: the kernels waiting for the dead rank are ended, so that the driver's
        thread gets back from whatever host sync or launch waits behind them."""
        self.lost = (rank, code)
        log.error("tensor-parallel worker rank %d exited (code %s)", rank, code)
        if self.device.type == "cuda":
            abort_one_shot_all_reduce()
            # The driver's thread then usually reaches its acknowledgement check and leaves the group itself. NCCL's
            # abort from this thread while that one is inside an NCCL call hung both (two H200s, the LM head's
            # all-gather), so this thread aborts only if the driver's thread is still stuck after a grace period.
            if not self._leaving.wait(LEAVE_GRACE_SECONDS):
                _leave_group(self._graphs())

    def _graphs(self) -> DecodeGraphs | None:
        """The driver's decode graphs while it is still here (close() frees it before leaving the group unless a
        worker was lost on a GPU)."""
        driver = self.__dict__.get("driver")
        return driver.graphs if driver is not None else None

    def _died(self, rank: int, proc: mp.Process, what: str) -> None:
        proc.join(1)
        hint = ' (a script that starts hylo must guard its entry with `if __name__ == "__main__":`)' if what == "process start" else ""
        self.dead = f"tensor-parallel worker rank {rank} exited (code {proc.exitcode}) during {what}{hint}; restart the engine"
        self.shutdown()
        raise WorkerDied(self.dead) from None

    def shutdown(self) -> None:
        self._leaving.set()
        if self.watch is not None:
            self.watch.stop()
            self.watch = None
        if self.conns:
            self.channel.post(PIPE)
        for conn in self.conns:
            try:
                conn.send(("shutdown", ()))
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1)
        self.procs, self.conns = [], []
        if self.channel is not None:
            self.channel.close(unlink=True)
            self.channel = None
        if self.size > 1:
            _leave_group(self._graphs())

"""Runs every call on all tensor-parallel ranks in lockstep: rank 0 in this process, ranks 1..N-1 in their own.

The driver sends each call (a method of `ModelWorker` and its arguments) down one pipe per worker,
runs it itself, then collects each worker's reply. A worker that raises replies with the error; a
worker that dies closes its pipe and its collective sockets, and the driver reports it within
seconds. With one rank there are no workers and no communication.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import signal
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from hylo.config import ModelConfig
from hylo.distributed import TPGroup
from hylo.engine.cache import CachePlan
from hylo.engine.config import EngineConfig
from hylo.engine.worker import ModelWorker

log = logging.getLogger("hylo")
COLLECTIVE_TIMEOUT = timedelta(minutes=5)  # a hung peer fails the step rather than the process


class WorkerDied(RuntimeError):
    """A tensor-parallel worker process exited; the engine cannot continue."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_group(rank: int, size: int, port: int, device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)


def _worker_main(conn, config: EngineConfig, model_config: ModelConfig, rank: int, port: int, device_type: str, dtype: torch.dtype) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; it shuts workers down
    size = config.tensor_parallel_size
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    try:
        conn.send(("ok", None))  # alive: the driver may now join the rendezvous without risking a long wait
        _init_group(rank, size, port, device)
        worker = ModelWorker(config, model_config, TPGroup(rank, size), device, dtype, progress=False)
        conn.send(("ok", None))
        while True:
            method, args = conn.recv()
            if method == "shutdown":
                break
            try:
                value = getattr(worker, method)(*args)
                conn.send(("ok", None if method == "execute" else value))
            except Exception as e:  # reported to the driver, which raises it
                conn.send(("error", e if _picklable(e) else RuntimeError(traceback.format_exc())))
                if method == "execute":
                    break  # a failed step leaves the collectives out of step: stop, and the driver reports it
    except (EOFError, KeyboardInterrupt):
        pass  # the driver is gone
    except Exception as e:
        try:
            conn.send(("error", e if _picklable(e) else RuntimeError(traceback.format_exc())))
        except OSError:
            pass
    finally:
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
        self.dead: str | None = None
        try:
            if self.size > 1:
                self._start_workers(config, model_config, device, dtype)
            self.driver = ModelWorker(config, model_config, TPGroup(0, self.size), device, dtype, progress)
            _, errors = self._collect("start-up")
            if errors:
                raise errors[0]
            budget = min(self.call("cache_budget"))
            self.plan = CachePlan.fit(
                self.driver.shapes, budget, config.block_size, max_model_len, config.max_num_seqs, dtype
            )
            self.call("allocate", self.plan, max_model_len)
        except BaseException:
            self.close()
            raise

    def _start_workers(self, config, model_config, device, dtype) -> None:
        port = _free_port()
        ctx = mp.get_context("spawn")
        for rank in range(1, self.size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main, args=(child, config, model_config, rank, port, device.type, dtype), daemon=True, name=f"hylo-tp{rank}"
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
        """Run `method` on every rank; its return value per rank (rank 0 first)."""
        if self.dead:
            raise WorkerDied(self.dead)
        for conn in self.conns:
            try:
                conn.send((method, args))
            except OSError:
                pass  # reported by _collect
        error = None
        try:
            result = getattr(self.driver, method)(*args)
        except Exception as e:
            error, result = e, None
        values, errors = self._collect(method)
        if errors or error is not None:
            if method == "execute":  # the ranks' collectives are out of step now
                self.dead = f"a tensor-parallel step failed: {errors[0] if errors else error}; restart the engine"
                self.shutdown()
            raise errors[0] if errors else error  # a worker's own error is the root cause
        return [result] + values

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
                proc.join(1)
                hint = ' (a script that starts hylo must guard its entry with `if __name__ == "__main__":`)' if what == "process start" else ""
                self.dead = f"tensor-parallel worker rank {rank} exited (code {proc.exitcode}) during {what}{hint}; restart the engine"
                self.shutdown()
                raise WorkerDied(self.dead) from None
            if status == "error":
                errors.append(value)
            values.append(value)
        return values, errors

    def close(self) -> None:
        """Stop the workers and free this process's share too (model, caches, graphs), so that another engine
        can start in the same process."""
        self.shutdown()
        self.dead = self.dead or "the engine has been shut down; start a new one"
        self.__dict__.pop("driver", None)
        gc.collect()  # the model's modules refer to each other (shared LoRA batch, tied weights)
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def shutdown(self) -> None:
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
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()

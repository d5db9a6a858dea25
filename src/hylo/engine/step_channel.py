"""Each step's inputs from the driver to the tensor-parallel workers through one shared-memory buffer.

A step is a few hundred integers; pickling it and sending it down a pipe per worker, then waiting for a
pickled reply, cost more host time than the step's own launches. Here the driver writes the packed step
(`StepInput.pack`) and bumps a sequence number; each worker spins on that number, reads the step, runs
it, and writes the number back into its own acknowledgement word (negated if the step raised, and the
error follows on its pipe). Calls other than steps still travel on the pipes: the driver first posts a
message saying "read your pipe", so that pipe calls and steps reach each worker in the order sent.

Stores and loads of aligned 8-byte words are not torn on the machines hylo runs on (x86-64, and the
aarch64 hosts of GPUs), and the sequence number is written after the data it announces.
"""

from __future__ import annotations

import array
import time
from multiprocessing import shared_memory

import numpy as np

STEP, PIPE = 1, 2  # what a message is: a packed step in the buffer, or "the next call is on your pipe"
HEADER_WORDS = 8  # seq, kind, length, spare; then one acknowledgement word per worker
SPIN_SECONDS = 0.05  # after a message, a worker polls without sleeping this long: steps come every few ms
# Polling while another thread of the process needs the GIL (an adapter read): a spinning poll would hold it,
# and that thread would get it back only once per switch interval. A short sleep lets it go each time.
SHARED_POLL_SECONDS = 5e-5


class StepChannel:
    def __init__(self, num_workers: int, capacity_bytes: int = 16 << 20, name: str | None = None):
        words = HEADER_WORDS + num_workers
        self.num_workers = num_workers
        # Workers attach by name; spawned processes share the driver's resource tracker, so only the driver's
        # unlink at shutdown ends the buffer.
        self.shm = shared_memory.SharedMemory(name=name, create=name is None, size=8 * words + capacity_bytes)
        self.header = np.ndarray((words,), dtype=np.int64, buffer=self.shm.buf)
        self.data = np.ndarray((capacity_bytes // 8,), dtype=np.int64, buffer=self.shm.buf, offset=8 * words)
        self.seq = int(self.header[0])

    @property
    def name(self) -> str:
        return self.shm.name

    # -- driver -------------------------------------------------------------------------------------

    def fits(self, packed: array.array) -> bool:
        return len(packed) <= len(self.data)

    def post(self, kind: int, packed: array.array | None = None) -> int:
        """Announce a message (the workers have acknowledged the previous one); its sequence number."""
        if packed is not None:
            self.data[: len(packed)] = np.frombuffer(packed, dtype=np.int64)
            self.header[2] = len(packed)
        self.header[1] = kind
        self.seq += 1
        self.header[0] = self.seq
        return self.seq

    def acknowledged(self, worker: int) -> int:
        return int(self.header[HEADER_WORDS + worker])

    # -- worker -------------------------------------------------------------------------------------

    def wait(self, alive, share_gil: bool = False) -> tuple[int, np.ndarray | None]:
        """The next message: (kind, the packed step for STEP). Polls, sleeping only after SPIN_SECONDS of quiet
        (or at once when `share_gil`: another thread of this process is working); returns (0, None) once
        `alive()` says the driver is gone."""
        last = time.monotonic()
        pause = SHARED_POLL_SECONDS if share_gil else 0.0
        while int(self.header[0]) == self.seq:
            if pause:
                time.sleep(pause)
            if time.monotonic() - last > SPIN_SECONDS:
                if not alive():
                    return 0, None
                pause = min(0.002, pause + 1e-4)
        self.seq += 1
        kind = int(self.header[1])
        return kind, (self.data[: int(self.header[2])].copy() if kind == STEP else None)

    def acknowledge(self, worker: int, ok: bool) -> None:
        self.header[HEADER_WORDS + worker] = self.seq if ok else -self.seq

    def close(self, unlink: bool = False) -> None:
        del self.header, self.data  # views into the buffer must go before it can close
        self.shm.close()
        if unlink:
            self.shm.unlink()

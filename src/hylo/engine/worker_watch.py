"""A thread that notices a tensor-parallel worker's exit when it happens, not at the driver's next look.

On GPUs the driver's own thread may by then be blocked for good: a collective of the step it is running waits on the
GPU for the dead peer, and the next host sync (or kernel launch, once the launch queue is full) waits behind it. The
executor's callback therefore tells the one-shot all-reduce's kernels to stop waiting, and aborts NCCL's communicators
if the driver's thread has not left the group itself within a grace period; the driver's thread then fails its next
collective, or finds the worker gone at its acknowledgement check, and reports WorkerDied.

Each worker watches its driver the same way (`executor._Driver`), and ends itself if the driver dies mid-step.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from typing import Callable

WATCH_SECONDS = 0.1


class WorkerWatch:
    def __init__(self, procs: list[mp.Process], on_exit: Callable[[int, int | None], None]):
        """`on_exit(rank, exit code)` runs once, on this watch's thread, for the first worker found gone."""
        self.procs = list(procs)  # ranks 1..N-1
        self.on_exit = on_exit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hylo-worker-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(WATCH_SECONDS):
            for rank, proc in enumerate(self.procs, start=1):
                if not proc.is_alive():
                    self.on_exit(rank, proc.exitcode)
                    return

    def stop(self) -> None:
        """Before the workers are told to exit: their orderly exit is no loss."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

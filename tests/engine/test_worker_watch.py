"""The worker watch reports a worker's exit as it happens, once, and not an exit the driver asked for."""

import multiprocessing as mp
import threading
import time

from hylo.engine.worker_watch import WorkerWatch


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _procs(*seconds: float) -> list:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_sleep, args=(s,), daemon=True) for s in seconds]
    for p in procs:
        p.start()
    return procs


def test_the_first_worker_to_exit_is_reported_once_with_its_rank():
    procs = _procs(30, 0)  # rank 2 exits at once
    seen, done = [], threading.Event()
    watch = WorkerWatch(procs, lambda rank, code: (seen.append((rank, code)), done.set()))
    try:
        assert done.wait(20)
        time.sleep(0.3)
        assert seen == [(2, 0)]
    finally:
        watch.stop()
        for p in procs:
            p.kill()
            p.join()


def test_a_stopped_watch_reports_nothing():
    procs = _procs(0.5)
    seen = []
    watch = WorkerWatch(procs, lambda rank, code: seen.append(rank))
    watch.stop()
    procs[0].join()
    time.sleep(0.3)
    assert seen == []

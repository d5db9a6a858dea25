"""The one-shot all-reduce kernel (with and without the fused residual add and RMSNorm) on two GPUs against NCCL and
the torch reference (marked `gpu`, skipped where fewer than two GPUs are present): sums equal to NCCL's in the
activation dtype, identical bits on every rank, eager and inside a replayed CUDA graph, the LM head's logits gathered
to the driver as NCCL's all-gather gives them, the driver's sampled tokens broadcast to the workers, and a peer that
never comes ends the wait once the abort flag is raised."""

import os
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hylo.distributed import OneShotAllReduce
from hylo.engine.executor import _free_port
from hylo.kernels import reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

WIDTH = 72  # not a power of two: the kernel's masked tail is exercised
VOCAB_LOCAL = 5000  # a gather row is two column blocks, the second one partly masked
EPS = 1e-6


def _start(rank: int, port: int) -> None:
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, device_id=torch.device("cuda", rank))


def _expected(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor):
    total = x.float().clone()
    dist.all_reduce(total)  # in float32 the sum of two values is exact: rounding it once is what the kernel must give
    total = total.to(x.dtype)
    return total, reference.rms_norm(total, weight, EPS, residual)


def _same_on_every_rank(t: torch.Tensor) -> None:
    pieces = [torch.empty_like(t) for _ in range(2)]
    dist.all_gather(pieces, t)
    assert torch.equal(pieces[0], pieces[1])


def _sums_and_norms(rank: int, port: int, dtype: torch.dtype) -> None:
    _start(rank, port)
    one_shot = OneShotAllReduce(torch.device("cuda", rank), WIDTH, dtype, VOCAB_LOCAL, max_bytes=64 * WIDTH * dtype.itemsize,
                                max_logit_bytes=16 * VOCAB_LOCAL * dtype.itemsize)
    weight = torch.randn(WIDTH, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).to(dtype) * 0.1
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    g = torch.Generator("cuda").manual_seed(1 + rank)
    for call, rows in enumerate([1, 3, 64, 17, 1, 64, 2] * 3):  # row slots reused at both parities, with odd counts between
        x = torch.randn(rows, WIDTH, device="cuda", dtype=dtype, generator=g)
        residual = torch.randn(rows, WIDTH, device="cuda", dtype=dtype, generator=torch.Generator("cuda").manual_seed(100 + call))
        total, (normed, summed) = _expected(x, residual, weight)
        assert torch.equal(one_shot(x), total)
        got_normed, got_summed = one_shot.rms_norm(x, weight, EPS, residual)
        assert torch.equal(got_summed, summed)
        torch.testing.assert_close(got_normed, normed, **tol)
        got_normed, got_summed = one_shot.rms_norm(x, weight, EPS, None)
        assert torch.equal(got_summed, total)
        torch.testing.assert_close(got_normed, reference.rms_norm(total, weight, EPS), **tol)
        _same_on_every_rank(got_normed)
    # Captured: a graph of several all-reduces replayed with new inputs each time.
    x = torch.zeros(5, WIDTH, device="cuda", dtype=dtype)
    residual = torch.zeros_like(x)
    one_shot(x), one_shot.rms_norm(x, weight, EPS, residual)  # compiled before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        reduced = one_shot(x)
        normed, summed = one_shot.rms_norm(reduced, weight, EPS, residual)
    for _ in range(20):
        x.copy_(torch.randn(x.shape, device="cuda", dtype=dtype, generator=g))
        residual.copy_(torch.randn(x.shape, device="cuda", dtype=dtype, generator=g))
        graph.replay()
        total, _ = _expected(x, None, weight)
        _, (want_normed, want_summed) = _expected(total, residual, weight)
        assert torch.equal(reduced, total)
        assert torch.equal(summed, want_summed)
        torch.testing.assert_close(normed, want_normed, **tol)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_shot_sums_equal_nccl_and_norms_equal_the_reference(dtype):
    mp.spawn(_sums_and_norms, args=(_free_port(), dtype), nprocs=2)


def _gathers(rank: int, port: int, dtype: torch.dtype) -> None:
    _start(rank, port)
    one_shot = OneShotAllReduce(torch.device("cuda", rank), WIDTH, dtype, VOCAB_LOCAL, max_bytes=64 * WIDTH * dtype.itemsize,
                                max_logit_bytes=16 * VOCAB_LOCAL * dtype.itemsize)
    g = torch.Generator("cuda").manual_seed(5 + rank)

    def expected(x: torch.Tensor) -> torch.Tensor:
        pieces = [torch.empty_like(x) for _ in range(2)]
        dist.all_gather(pieces, x)
        return torch.cat(pieces, dim=-1)

    for rows in [1, 16, 3, 16, 1, 2]:  # slots reused with different row counts between
        x = torch.randn(rows, VOCAB_LOCAL, device="cuda", dtype=dtype, generator=g)
        got = one_shot.gather_to_driver(x)
        want = expected(x)
        if rank == 0:
            assert torch.equal(got, want)
    x = torch.zeros(4, VOCAB_LOCAL, device="cuda", dtype=dtype)
    one_shot.gather_to_driver(x)  # compiled before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gathered = one_shot.gather_to_driver(x)
    for _ in range(10):
        x.copy_(torch.randn(x.shape, device="cuda", dtype=dtype, generator=g))
        graph.replay()
        want = expected(x)
        if rank == 0:
            assert torch.equal(gathered, want)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_gathered_to_the_driver_equal_nccl_all_gather(dtype):
    mp.spawn(_gathers, args=(_free_port(), dtype), nprocs=2)


def _broadcasts(rank: int, port: int) -> None:
    _start(rank, port)
    one_shot = OneShotAllReduce(torch.device("cuda", rank), WIDTH, torch.float32, VOCAB_LOCAL, max_bytes=64 * WIDTH * 4,
                                max_logit_bytes=16 * VOCAB_LOCAL * 4)
    g = torch.Generator("cuda").manual_seed(7)  # the same tokens drawn on both ranks: what the workers must receive
    between = torch.ones(1, WIDTH, device="cuda")
    for n in [1, 5, 256, 33, 1, 4096, 2]:
        tokens = torch.randint(0, 1 << 40, (n,), device="cuda", generator=g)
        x = tokens.clone() if rank == 0 else torch.full((n,), -1, dtype=torch.long, device="cuda")
        one_shot.broadcast_from_driver(x)
        one_shot(between)  # a collective between two broadcasts, as a step's all-reduces are
        assert torch.equal(x, tokens)
    dist.barrier()
    dist.destroy_process_group()


def test_tokens_broadcast_from_the_driver_reach_every_worker():
    mp.spawn(_broadcasts, args=(_free_port(),), nprocs=2)


def _abandoned(rank: int, port: int) -> None:
    _start(rank, port)
    one_shot = OneShotAllReduce(torch.device("cuda", rank), WIDTH, torch.bfloat16, VOCAB_LOCAL, max_bytes=64 * WIDTH * 2,
                                max_logit_bytes=16 * VOCAB_LOCAL * 2)
    x = torch.ones(4, WIDTH, device="cuda", dtype=torch.bfloat16)
    one_shot(x)  # both ranks once: compiled and in step
    torch.cuda.synchronize()
    dist.barrier()
    if rank == 1:
        return  # never takes part again: rank 0 waits for it until told to stop
    threading.Timer(1.0, one_shot.abort).start()
    start = time.monotonic()
    for _ in range(8):  # the first waits for the abort; the rest must not wait at all
        one_shot.rms_norm(x, x[0], EPS, x)
        one_shot.gather_to_driver(torch.ones(2, VOCAB_LOCAL, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()
    assert 0.9 < time.monotonic() - start < 20


def test_a_peer_that_never_comes_is_abandoned_when_the_abort_flag_is_raised():
    mp.spawn(_abandoned, args=(_free_port(),), nprocs=2)


def _driver_gone(rank: int, port: int) -> None:
    _start(rank, port)
    one_shot = OneShotAllReduce(torch.device("cuda", rank), WIDTH, torch.bfloat16, VOCAB_LOCAL, max_bytes=64 * WIDTH * 2,
                                max_logit_bytes=16 * VOCAB_LOCAL * 2)
    tokens = torch.zeros(4, dtype=torch.long, device="cuda")
    one_shot.broadcast_from_driver(tokens)  # both ranks once: compiled and in step
    torch.cuda.synchronize()
    dist.barrier()
    if rank == 0:
        return  # the driver never sends again: the worker waits for it until told to stop
    threading.Timer(1.0, one_shot.abort).start()
    start = time.monotonic()
    for _ in range(4):
        one_shot.broadcast_from_driver(tokens)
    torch.cuda.synchronize()
    assert 0.9 < time.monotonic() - start < 20


def test_a_worker_waiting_for_a_driver_that_never_sends_is_released_by_the_abort_flag():
    mp.spawn(_driver_gone, args=(_free_port(),), nprocs=2)

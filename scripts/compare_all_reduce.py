"""All-reduce inside a captured CUDA graph: NCCL against the one-shot all-reduce over peer-to-peer symmetric memory,
alone and with the residual add and RMSNorm fused in, per message size, on every GPU of the machine (one process
each). Prints µs per call and the one-shot's error against NCCL; then the LM head's logits gathered to the driver
through the same peer memory against NCCL's all-gather.

    python scripts/compare_all_reduce.py [--rows 1,16,...] [--width 4096] [--dtype bfloat16]

NVLink multicast stays off (the one-shot reads peers' buffers directly; no multicast object is made).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hylo.bench import graph_us
from hylo.distributed import OneShotAllReduce
from hylo.kernels.triton_norms import rms_norm


def worker(rank: int, size: int, port: int, rows: list[int], width: int, vocab: int, dtype: torch.dtype) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size, device_id=torch.device("cuda", rank))
    vocab_local = vocab // size
    one_shot = OneShotAllReduce(torch.device("cuda", rank), width, dtype, vocab_local)
    weight = torch.randn(width, device="cuda", dtype=dtype)
    table = []
    warm = torch.zeros(rows[0], width, device="cuda", dtype=dtype)
    graph_us(lambda: dist.all_reduce(warm), calls=50)  # NCCL's first captured graph carries its set-up: not timed
    for n in rows:
        x = torch.randn(n, width, device="cuda", dtype=dtype, generator=torch.Generator("cuda").manual_seed(rank))
        residual = torch.randn_like(x)
        expected = x.clone()
        dist.all_reduce(expected)
        fits = one_shot.fits(x)
        error = ((one_shot(x).float() - expected.float()).norm() / expected.float().norm()).item() if fits else float("nan")
        # 50 calls per captured graph: launch gaps drop out as they do inside a decode step
        nccl = graph_us(lambda: dist.all_reduce(x), calls=50)
        nccl_norm = graph_us(lambda: (dist.all_reduce(x), rms_norm(x, weight, 1e-6, residual)), calls=50)
        fast = graph_us(lambda: one_shot(x), calls=50) if fits else float("nan")
        fused = graph_us(lambda: one_shot.rms_norm(x, weight, 1e-6, residual), calls=50) if fits else float("nan")
        table.append((n, n * width * dtype.itemsize, nccl, fast, nccl_norm, fused, error))
    gathers = []
    for n in (r for r in rows if r <= one_shot.logit_rows):
        x = torch.randn(n, vocab_local, device="cuda", dtype=dtype)
        pieces = [torch.empty_like(x) for _ in range(size)]

        def nccl_gather() -> torch.Tensor:
            dist.all_gather(pieces, x)
            return torch.cat(pieces, dim=-1)

        nccl = graph_us(nccl_gather, calls=50)
        fast = graph_us(lambda: one_shot.gather_to_driver(x), calls=50)
        gathers.append((n, n * vocab_local * dtype.itemsize, nccl, fast))
    if rank == 0:
        print(f"LM head logits, {vocab_local} columns per rank: µs per gather inside a CUDA graph")
        print(f"{'rows':>6} {'bytes/rank':>11} {'nccl all-gather + cat':>22} {'to the driver':>14}")
        for n, nbytes, nccl, fast in gathers:
            print(f"{n:>6} {nbytes:>11} {nccl:>22.1f} {fast:>14.1f}")
    if rank == 0:
        print(f"{size} GPUs ({torch.cuda.get_device_name()}), {dtype}, rows of {width}, µs per call inside a CUDA graph")
        print(f"{'rows':>6} {'bytes':>10} {'nccl':>8} {'one-shot':>9} {'nccl+norm':>10} {'fused':>8} {'rel. error':>11}")
        for n, nbytes, nccl, fast, nccl_norm, fused, error in table:
            print(f"{n:>6} {nbytes:>10} {nccl:>8.1f} {fast:>9.1f} {nccl_norm:>10.1f} {fused:>8.1f} {error:>11.1e}")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    # A 9B decode step all-reduces [batch, 4096]; prefill [tokens, 4096].
    p.add_argument("--rows", default="1,4,16,64,128,256,512,2048")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=248320)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    size = torch.cuda.device_count()
    rows = [int(r) for r in args.rows.split(",")]
    from hylo.engine.executor import _free_port

    mp.spawn(worker, args=(size, _free_port(), rows, args.width, args.vocab, getattr(torch, args.dtype)), nprocs=size)


if __name__ == "__main__":
    main()

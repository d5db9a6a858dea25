"""All-reduce inside a captured CUDA graph: NCCL against a one-shot all-reduce over peer-to-peer symmetric memory,
per message size, on every GPU of the machine (one process each). Prints µs per all-reduce and the one-shot's
error against a float32 all-reduce.

    python scripts/compare_all_reduce.py [--sizes 4096,65536,...] [--dtype bfloat16]

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


def worker(rank: int, size: int, port: int, sizes: list[int], dtype: torch.dtype) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size, device_id=torch.device("cuda", rank))
    one_shot = OneShotAllReduce(torch.device("cuda", rank), max(sizes) * dtype.itemsize)
    rows = []
    for numel in sizes:
        x = torch.randn(numel, device="cuda", dtype=dtype, generator=torch.Generator("cuda").manual_seed(rank))
        expected = x.float().clone()
        dist.all_reduce(expected)
        got = one_shot(x.clone())
        error = ((got.float() - expected).norm() / expected.norm()).item()
        # 50 all-reduces per captured graph: launch gaps drop out as they do inside a decode step
        nccl = graph_us(lambda: dist.all_reduce(x), calls=50)
        fast = graph_us(lambda: one_shot(x), calls=50)
        rows.append((numel, numel * dtype.itemsize, nccl, fast, error))
    if rank == 0:
        print(f"{size} GPUs ({torch.cuda.get_device_name()}), {dtype}, µs per all-reduce inside a CUDA graph")
        print(f"{'elements':>10} {'bytes':>10} {'nccl':>8} {'one-shot':>9} {'rel. error':>11}")
        for numel, nbytes, nccl, fast, error in rows:
            print(f"{numel:>10} {nbytes:>10} {nccl:>8.1f} {fast:>9.1f} {error:>11.1e}")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    # A 9B decode step all-reduces [batch, 4096]; prefill [tokens, 4096].
    p.add_argument("--sizes", default=",".join(str(4096 * b) for b in (1, 4, 16, 64, 128, 256, 512, 2048)))
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    size = torch.cuda.device_count()
    sizes = [int(s) for s in args.sizes.split(",")]
    from hylo.engine.executor import _free_port

    mp.spawn(worker, args=(size, _free_port(), sizes, getattr(torch, args.dtype)), nprocs=size)


if __name__ == "__main__":
    main()

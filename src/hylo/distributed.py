"""The tensor-parallel group a model is built for, and the collectives its layers call."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("hylo")

# Messages up to this size take the one-shot all-reduce when it is on. scripts/compare_all_reduce.py, two H200s,
# bf16, µs per all-reduce inside a CUDA graph (NCCL / one-shot): 8 KiB 11.8 / 6.7, 512 KiB 15.5 / 11.2,
# 2 MiB 32.2 / 21.5, 4 MiB 37.4 / 35.4, 16 MiB 83.2 / 134.
ONE_SHOT_MAX_BYTES = 4 << 20


class OneShotAllReduce:
    """Every rank's tensor summed in one kernel that reads the peers' copies straight from their memory
    (peer-to-peer symmetric memory): for the small messages of a decode step it skips NCCL's protocol steps.
    Graph-safe. NVLink multicast is not used (TORCH_SYMM_MEM_DISABLE_MULTICAST stays set)."""

    def __init__(self, device: torch.device, max_bytes: int):
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = dist.group.WORLD.group_name
        self.max_bytes = max_bytes
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

    def fits(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return x.is_contiguous() and nbytes <= self.max_bytes and nbytes % 16 == 0 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        staging = self.buffer[: x.numel() * x.element_size()].view(x.dtype).view(x.shape)
        return torch.ops.symm_mem.one_shot_all_reduce_copy(staging, x, "sum", self.group_name)


_one_shot: OneShotAllReduce | None = None
_rendezvoused: set[str] = set()  # the process group names this process has set up symmetric memory under


def can_enable_one_shot_all_reduce() -> bool:
    """Whether this process may set up the one-shot all-reduce for its current group. torch names every new default
    group "0" and keeps, for the process's lifetime, the store it first rendezvoused symmetric memory with under a
    name: a second engine in one process (a notebook, a test run) would rendezvous through its predecessor's dead
    store and hang. Such an engine leaves every all-reduce to NCCL. The driver decides for all ranks, since the
    workers are new processes."""
    return dist.group.WORLD.group_name not in _rendezvoused


def enable_one_shot_all_reduce(device: torch.device) -> None:
    """Small all-reduces of this process's group go through OneShotAllReduce from now on, where the GPUs can read
    each other's memory; elsewhere NCCL keeps them all (logged)."""
    global _one_shot
    _rendezvoused.add(dist.group.WORLD.group_name)
    try:
        _one_shot = OneShotAllReduce(device, ONE_SHOT_MAX_BYTES)
    except Exception as e:  # no peer access between these GPUs, or no symmetric memory in this torch
        log.info("one-shot all-reduce unavailable (%s); NCCL does every all-reduce", e)


def disable_one_shot_all_reduce() -> OneShotAllReduce | None:
    """All-reduces go to NCCL from now on; the one-shot all-reduce that served until now, for a caller that must
    decide when its buffer is freed."""
    global _one_shot
    one_shot, _one_shot = _one_shot, None
    return one_shot


@dataclass(frozen=True)
class TPGroup:
    """This process's place among `size` tensor-parallel ranks (size 1: no communication)."""

    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        if _one_shot is not None and _one_shot.fits(x):
            return _one_shot(x)
        dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` along the last dimension, in rank order."""
        if self.size == 1:
            return x
        pieces = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(pieces, x.contiguous())
        return torch.cat(pieces, dim=-1)

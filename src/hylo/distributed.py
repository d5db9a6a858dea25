"""The tensor-parallel group a model is built for, and the collectives its layers call."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("hylo")

# Messages up to this size take the one-shot all-reduce when it is on. scripts/compare_all_reduce.py, two H200s,
# bf16, µs per all-reduce inside a CUDA graph (NCCL / torch's one-shot kernel, which ours replaced): 8 KiB 11.8 / 6.7,
# 512 KiB 15.5 / 11.2, 2 MiB 32.2 / 21.5, 4 MiB 37.4 / 35.4, 16 MiB 83.2 / 134.
ONE_SHOT_MAX_BYTES = 4 << 20
# The LM head's logits gathered to the driver through peer memory, up to this size (9B at TP=2: 256 rows).
GATHER_MAX_BYTES = 64 << 20
FLAG_ALIGN = 256  # bytes: the rows after the flag table start aligned for vector loads


class _PeerBuffer:
    """A buffer every rank can read and write in every other rank's memory (symmetric memory): a table of int64
    flags, `flag_slots` per rank, then `data_bytes` of data. `flag_bases` and `data_bases` hold each rank's
    addresses, as the kernels take them."""

    def __init__(self, device: torch.device, flag_slots: int, data_bytes: int):
        import torch.distributed._symmetric_memory as symm_mem

        flag_bytes = -(-flag_slots * dist.get_world_size() * 8 // FLAG_ALIGN) * FLAG_ALIGN
        self.buffer = symm_mem.empty(flag_bytes + data_bytes, dtype=torch.uint8, device=device)
        self.buffer[:flag_bytes].zero_()
        torch.cuda.synchronize(device)  # zeroed on every rank before any rank can signal: the rendezvous is a barrier
        handle = symm_mem.rendezvous(self.buffer, dist.group.WORLD.group_name)
        self.flag_bases = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)
        self.data_bases = self.flag_bases + flag_bytes


class OneShotAllReduce:
    """All-reduces of [rows, width] activations in one kernel that reads the peers' rows straight from their memory
    (peer-to-peer symmetric memory), skipping NCCL's protocol steps for the small messages of a decode step; the
    residual add and RMSNorm that follow can run in the same launch. The LM head's logits [rows, vocab_local] are
    gathered to the driver the same way, so a decode step's collectives skip NCCL (with async scheduling, the last
    step's tokens still reach the workers by an NCCL broadcast: TPGroup.broadcast_from_driver). Graph-safe. NVLink
    multicast is not used (TORCH_SYMM_MEM_DISABLE_MULTICAST stays set). `abort()` ends every wait for a peer that will
    never come (kernels/triton_all_reduce.py)."""

    def __init__(self, device: torch.device, width: int, dtype: torch.dtype, vocab_local: int, max_bytes: int = ONE_SHOT_MAX_BYTES,
                 max_logit_bytes: int = GATHER_MAX_BYTES):
        from hylo.kernels.triton_all_reduce import GATHER_BLOCK

        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.width, self.vocab_local, self.dtype = width, vocab_local, dtype
        self.capacity_rows = max_bytes // (width * dtype.itemsize)
        self.rows = _PeerBuffer(device, self.capacity_rows, 2 * self.capacity_rows * width * dtype.itemsize)
        self.row_epochs = torch.zeros(self.capacity_rows, dtype=torch.int64, device=device)
        self.logit_rows = max_logit_bytes // (vocab_local * dtype.itemsize)
        slots = self.logit_rows * -(-vocab_local // GATHER_BLOCK)
        self.logits = _PeerBuffer(device, slots, self.logit_rows * vocab_local * dtype.itemsize)
        self.logit_epochs = torch.zeros(slots, dtype=torch.int64, device=device)
        self.abort_host = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        self.dead = torch.zeros(1, dtype=torch.int32, device=device)

    def fits(self, x: torch.Tensor) -> bool:
        return x.dim() == 2 and x.shape[1] == self.width and x.shape[0] <= self.capacity_rows and x.dtype == self.dtype and x.is_contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The all-reduce alone: the model always takes `rms_norm`; this is the kernel scripts/compare_all_reduce.py
        measures against NCCL, and the tests check against NCCL's sums."""
        out = torch.empty_like(x)
        self._launch(x, None, None, 0.0, out, None, norm=False)
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(Σ x + residual), Σ x + residual), as rms_norm(all_reduce(x), weight, eps, residual) returns them."""
        out, res_out = torch.empty_like(x), torch.empty_like(x)
        self._launch(x, residual, weight, eps, out, res_out, norm=True)
        return out, res_out

    def gathers(self, x: torch.Tensor) -> bool:
        return x.dim() == 2 and x.shape[1] == self.vocab_local and x.shape[0] <= self.logit_rows and x.dtype == self.dtype and x.is_contiguous()

    def gather_to_driver(self, x: torch.Tensor) -> torch.Tensor:
        """On rank 0, every rank's `x` side by side along the last dimension, in rank order; elsewhere `x` itself (the
        workers' logits are not read)."""
        from hylo.kernels.triton_all_reduce import launch_gather_to_driver

        out = torch.empty(x.shape[0], self.world_size * x.shape[1], dtype=x.dtype, device=x.device) if self.rank == 0 else x
        launch_gather_to_driver(x, out, self.logits.data_bases, self.logits.flag_bases, self.logit_epochs, self.abort_host, self.dead,
                                self.rank, self.world_size)
        return out

    def abort(self) -> None:
        """A peer is gone: every wait for it ends (safe from any thread; the kernels read this flag while they spin)."""
        self.abort_host.fill_(1)

    def _launch(self, x, residual, weight, eps, out, res_out, norm: bool) -> None:
        from hylo.kernels.triton_all_reduce import launch_all_reduce_rows

        launch_all_reduce_rows(x, residual, weight, eps, out, res_out, self.rows.data_bases, self.rows.flag_bases, self.row_epochs,
                               self.abort_host, self.dead, self.capacity_rows, self.rank, self.world_size, norm)


_one_shot: OneShotAllReduce | None = None
_rendezvoused: set[str] = set()  # the process group names this process has set up symmetric memory under


def can_enable_one_shot_all_reduce() -> bool:
    """Whether this process may set up the one-shot all-reduce for its current group. torch names every new default
    group "0" and keeps, for the process's lifetime, the store it first rendezvoused symmetric memory with under a
    name: a second engine in one process (a notebook, a test run) would rendezvous through its predecessor's dead
    store and hang. Such an engine leaves every all-reduce to NCCL. The driver decides for all ranks, since the
    workers are new processes."""
    return dist.group.WORLD.group_name not in _rendezvoused


def enable_one_shot_all_reduce(device: torch.device, width: int, dtype: torch.dtype, vocab_local: int) -> None:
    """Small all-reduces of this process's group ([rows, width] in `dtype`: the residual stream's) and the LM head's
    gathers ([rows, vocab_local]) go through OneShotAllReduce from now on, where the GPUs can read each other's memory;
    elsewhere NCCL keeps them all (logged)."""
    global _one_shot
    _rendezvoused.add(dist.group.WORLD.group_name)
    size = dist.get_world_size()
    if size & (size - 1):
        log.info("one-shot all-reduce off for %d ranks (it reduces a power of two); NCCL does every all-reduce", size)
        return
    try:
        _one_shot = OneShotAllReduce(device, width, dtype, vocab_local)
    except Exception as e:  # no peer access between these GPUs, or no symmetric memory in this torch
        log.info("one-shot all-reduce unavailable (%s); NCCL does every all-reduce", e)
        return
    import torch.distributed._symmetric_memory as symm_mem

    # The backend decides what symmetric memory costs and whether it is ever given back (an NVSHMEM heap is not).
    log.info("one-shot all-reduce on, up to %d rows of %d, logits gathered to the driver up to %d rows; symmetric memory "
             "backend %s", _one_shot.capacity_rows, width, _one_shot.logit_rows, symm_mem.get_backend(device))


def abort_one_shot_all_reduce() -> None:
    """A peer is gone: the one-shot kernels stop waiting for it (safe from any thread)."""
    if _one_shot is not None:
        _one_shot.abort()


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

    def all_reduce_rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                            rms_norm) -> tuple[torch.Tensor, torch.Tensor]:
        """rms_norm(Σ_ranks x, weight, eps, residual) as (normed, sum): one launch for all three where the one-shot
        all-reduce takes x, else NCCL (gloo on the CPU) and `rms_norm`, the device's norm. The model's only all-reduce:
        every partial sum is reduced inside the residual stream's next norm."""
        if self.size > 1:
            if _one_shot is not None and _one_shot.fits(x):
                return _one_shot.rms_norm(x, weight, eps, residual)
            dist.all_reduce(x)
        return (rms_norm(x, weight, eps), x) if residual is None else rms_norm(x, weight, eps, residual)

    def gather_last_to_driver(self, x: torch.Tensor) -> torch.Tensor:
        """On rank 0 (the driver), every rank's `x` concatenated along the last dimension in rank order; on the other
        ranks whatever serves that (their result is not read)."""
        if self.size > 1 and _one_shot is not None and _one_shot.gathers(x):
            return _one_shot.gather_to_driver(x)
        return self.all_gather_last(x)

    def broadcast_from_driver(self, x: torch.Tensor) -> None:
        """x on every rank = rank 0's x (in place; queued on the stream, the host does not wait)."""
        if self.size > 1:
            dist.broadcast(x, src=0)

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` along the last dimension, in rank order."""
        if self.size == 1:
            return x
        pieces = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(pieces, x.contiguous())
        return torch.cat(pieces, dim=-1)

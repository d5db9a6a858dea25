"""One-shot all-reduce of rows over peer-to-peer symmetric memory, optionally with the residual add and RMSNorm that
follow every all-reduce of the residual stream, in one launch; and the LM head's gather of logits to the driver.

Each program owns one row. It copies its row into this rank's buffer, publishes the row's epoch (how many times this
row slot has been reduced) in every rank's flag table, waits until every rank has published it, then sums the ranks'
rows in rank order (so that every rank gets the same bits). Buffers alternate by the epoch's parity: a rank writes a
row slot again only two epochs later, after every peer has published the epoch in between, which a peer does only
once its previous kernel, the reader of that slot, has finished. The epochs live on the device, so a captured CUDA
graph replays correctly without any host-side counter.

A peer that died never publishes: the wait also reads an abort flag in pinned host memory (every few thousand spins,
since each such read crosses PCIe), which the engine raises when it finds a worker gone; from then on every wait
gives up at once (a sticky flag on the device), the kernels finish with meaningless sums, and the host gets control
back instead of blocking behind a kernel that would spin forever.
"""

from __future__ import annotations

import triton
import triton.language as tl

ABORT_CHECK_SPINS = tl.constexpr(4096)  # spins between reads of the host's abort flag


@triton.jit
def _wait_for_peers(own_flags, row, epoch, abort_host, dead, W: tl.constexpr):
    addrs = own_flags + row * W + tl.arange(0, W)
    seen = tl.atomic_add(addrs, 0, sem="acquire", scope="sys")
    given_up = tl.load(dead, volatile=True)
    spins = 0
    while (tl.min(seen, axis=0) < epoch) & (given_up == 0):
        seen = tl.atomic_add(addrs, 0, sem="acquire", scope="sys")
        spins += 1
        if spins % ABORT_CHECK_SPINS == 0:
            given_up = tl.load(abort_host, volatile=True)
            if given_up != 0:
                tl.store(dead, 1)


@triton.jit
def _all_reduce_rows_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, data_bases, flag_bases, epochs, abort_host, dead,
                            n_cols, capacity_rows, eps, rank, W: tl.constexpr, BLOCK: tl.constexpr, NORM: tl.constexpr,
                            HAS_RES: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = x_ptr.dtype.element_ty
    epoch = tl.load(epochs + row) + 1
    tl.store(epochs + row, epoch)
    offset = ((epoch % 2) * capacity_rows + row) * n_cols
    own = tl.multiple_of(tl.load(data_bases + rank).to(tl.pointer_type(dtype)), 16)
    tl.store(own + offset + cols, tl.load(x_ptr + row * n_cols + cols, mask=mask), mask=mask)
    tl.debug_barrier()  # the whole row is written before any rank is told so
    peers = tl.arange(0, W)
    peer_flags = tl.load(flag_bases + peers).to(tl.pointer_type(tl.int64))
    tl.atomic_xchg(peer_flags + row * W + rank, epoch, sem="release", scope="sys")
    own_flags = tl.load(flag_bases + rank).to(tl.pointer_type(tl.int64))
    _wait_for_peers(own_flags, row, epoch, abort_host, dead, W)
    tl.debug_barrier()
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for p in tl.static_range(W):
        peer = tl.multiple_of(tl.load(data_bases + p).to(tl.pointer_type(dtype)), 16)
        total += tl.load(peer + offset + cols, mask=mask, other=0.0, volatile=True).to(tl.float32)
    x = total.to(dtype)  # what an all-reduce in the activation dtype returns
    if NORM:
        if HAS_RES:
            x = (x.to(tl.float32) + tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)).to(dtype)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, (xf * rstd * (1.0 + w)).to(dtype), mask=mask)
    else:
        tl.store(out_ptr + row * n_cols + cols, x, mask=mask)


def launch_all_reduce_rows(x, residual, weight, eps: float, out, res_out, data_bases, flag_bases, epochs, abort_host, dead,
                           capacity_rows: int, rank: int, world_size: int, norm: bool) -> None:
    rows, n_cols = x.shape
    _all_reduce_rows_kernel[(rows,)](
        x, residual if residual is not None else x, weight if weight is not None else x, out, res_out if res_out is not None else out,
        data_bases, flag_bases, epochs, abort_host, dead, n_cols, capacity_rows, eps, rank,
        W=world_size, BLOCK=triton.next_power_of_2(n_cols), NORM=norm, HAS_RES=residual is not None,
        num_warps=8 if n_cols >= 2048 else 4,
    )


@triton.jit
def _gather_to_driver_kernel(x_ptr, out_ptr, data_bases, flag_bases, epochs, abort_host, dead, n_cols, blocks_per_row, rank,
                             W: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, column block): every rank publishes its block of the row; rank 0 (the driver) waits for each
    rank's and writes the full row [rank 0's columns | rank 1's | ...] to out. One buffer suffices: a rank writes a
    slot again only in a later step, after a collective the driver joins once this gather has finished."""
    row = tl.program_id(0)
    block = tl.program_id(1)
    slot = row * blocks_per_row + block
    cols = block * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = x_ptr.dtype.element_ty
    epoch = tl.load(epochs + slot) + 1
    tl.store(epochs + slot, epoch)
    values = tl.load(x_ptr + row * n_cols + cols, mask=mask)
    if rank == 0:
        tl.store(out_ptr + row * W * n_cols + cols, values, mask=mask)
        own_flags = tl.multiple_of(tl.load(flag_bases).to(tl.pointer_type(tl.int64)), 16)
        # Slot `slot` of every rank signals in the driver's table at [slot, rank]; the driver's own entry is never
        # written, so it is waited for at the epoch it already has.
        tl.store(own_flags + slot * W, epoch)
        tl.debug_barrier()
        _wait_for_peers(own_flags, slot, epoch, abort_host, dead, W)
        tl.debug_barrier()
        for p in tl.static_range(1, W):
            peer = tl.multiple_of(tl.load(data_bases + p).to(tl.pointer_type(dtype)), 16)
            peer_values = tl.load(peer + row * n_cols + cols, mask=mask, other=0.0, volatile=True)
            tl.store(out_ptr + row * W * n_cols + p * n_cols + cols, peer_values, mask=mask)
    else:
        own = tl.multiple_of(tl.load(data_bases + rank).to(tl.pointer_type(dtype)), 16)
        tl.store(own + row * n_cols + cols, values, mask=mask)
        tl.debug_barrier()  # the whole block is written before the driver is told so
        driver_flags = tl.load(flag_bases).to(tl.pointer_type(tl.int64))
        tl.atomic_xchg(driver_flags + slot * W + rank, epoch, sem="release", scope="sys")


GATHER_BLOCK = 4096  # columns per program


def launch_gather_to_driver(x, out, data_bases, flag_bases, epochs, abort_host, dead, rank: int, world_size: int) -> None:
    rows, n_cols = x.shape
    blocks = triton.cdiv(n_cols, GATHER_BLOCK)
    _gather_to_driver_kernel[(rows, blocks)](x, out, data_bases, flag_bases, epochs, abort_host, dead, n_cols, blocks, rank,
                                             W=world_size, BLOCK=GATHER_BLOCK, num_warps=8)


@triton.jit
def _broadcast_from_driver_kernel(x_ptr, data_bases, flag_bases, epoch_ptr, abort_host, dead, n, rank, W: tl.constexpr,
                                  BLOCK: tl.constexpr):
    """One program: the driver (rank 0) writes x into its buffer and signals every worker, which waits for the signal
    and copies the driver's values into its own x. One buffer suffices: the driver writes it again only in a later
    step, after a collective that every worker joins once it has read this one (the step's first all-reduce)."""
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    epoch = tl.load(epoch_ptr) + 1
    tl.store(epoch_ptr, epoch)
    driver = tl.multiple_of(tl.load(data_bases).to(tl.pointer_type(tl.int64)), 16)
    peers = tl.arange(0, W)
    if rank == 0:
        tl.store(driver + cols, tl.load(x_ptr + cols, mask=mask), mask=mask)
        tl.debug_barrier()  # the whole row is written before any worker is told so
        peer_flags = tl.load(flag_bases + peers).to(tl.pointer_type(tl.int64))
        tl.atomic_xchg(peer_flags, epoch, mask=peers > 0, sem="release", scope="sys")  # entry 0 of each worker's row 0
    else:
        own_flags = tl.load(flag_bases + rank).to(tl.pointer_type(tl.int64))
        # Only the driver's entry of this row is ever written by a peer: the others are set here, so that only it is
        # waited for.
        tl.store(own_flags + peers, epoch, mask=peers > 0)
        tl.debug_barrier()
        _wait_for_peers(own_flags, 0, epoch, abort_host, dead, W)
        tl.debug_barrier()
        tl.store(x_ptr + cols, tl.load(driver + cols, mask=mask, other=0, volatile=True), mask=mask)


def launch_broadcast_from_driver(x, data_bases, flag_bases, epoch, abort_host, dead, rank: int, world_size: int) -> None:
    n = x.numel()
    _broadcast_from_driver_kernel[(1,)](x, data_bases, flag_bases, epoch, abort_host, dead, n, rank, W=world_size,
                                        BLOCK=triton.next_power_of_2(n), num_warps=4)

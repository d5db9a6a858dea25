"""LoRA slots inside the layers: each layer keeps `max_loras` adapters on the device, laid out like its base weight.

B mirrors the base weight's output rows (so a column-parallel part's B rows are split exactly like
its base rows, block by block); A mirrors its input columns (so a row-parallel part's A is split
along the input, and the partial products join the base output's all-reduce). Both are derived from
the layer's declared parts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hylo.layers.parts import Part

if TYPE_CHECKING:
    from hylo.kernels.triton_grouped import SortedRows


@dataclass
class LoRABatch:
    """Which adapter slot each token of the current step uses; one object shared by every LoRA layer."""

    token_slots: torch.Tensor | None = None  # [tokens], -1 = no adapter
    per_token: bool = False  # decode on CUDA: one BGMV launch pair reads `token_slots` (graph-safe)
    sorted_rows: SortedRows | None = None  # other CUDA steps: tokens sorted by slot, for the SGMV kernel
    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # on the CPU: (slot, its token indices)
    # The BGMV shrink's sums, float32: per token, a region for each LoRA layer of the step, zeroed in one launch per
    # step rather than one per call (~128 in a 9B step, ~0.1 ms of it on an H200).
    shrunk_width: int = 0  # floats per token, reserved by the layers as LoRA is enabled
    shrunk: torch.Tensor | None = None
    shrunk_used: int = 0
    replaced: list[torch.Tensor] = field(default_factory=list)  # earlier scratches, still read by captured graphs
    side: torch.cuda.Stream | None = None  # where a decode step's shrinks run, beside the base GEMMs

    @property
    def active(self) -> bool:
        """Whether a layer has LoRA work this step (a decode step's kernels skip base-model tokens themselves)."""
        return self.per_token or self.sorted_rows is not None or bool(self.groups)

    def reserve_shrunk(self, floats_per_token: int) -> None:
        """A layer's share of each decode step's scratch: what its calls in one step take per token."""
        self.shrunk_width += floats_per_token

    def start_step(self, token_slots: torch.Tensor | None, per_token: bool = False, sorted_rows: SortedRows | None = None,
                   groups: list[tuple[int, torch.Tensor]] | None = None) -> None:
        """The step's slots, and how its layers read them. A per-token step zeroes the scratch here, one launch for all
        layers (inside a captured step, so that each replay zeroes it too)."""
        self.token_slots, self.per_token, self.sorted_rows, self.groups = token_slots, per_token, sorted_rows, groups or []
        if not per_token:
            return
        size = token_slots.numel() * self.shrunk_width
        if self.shrunk is None or self.shrunk.numel() < size:
            if self.shrunk is not None:
                self.replaced.append(self.shrunk)
            self.shrunk = torch.empty(size, dtype=torch.float32, device=token_slots.device)
        self.shrunk[:size].zero_()
        self.shrunk_used = 0

    @contextmanager
    def beside(self, device: torch.device) -> Iterator[None]:
        """CUDA work launched inside runs on a second stream, after all that the current stream has launched so far,
        and may overlap what the current stream launches next, until `join`. Inside a captured step: a fork."""
        if device.type != "cuda":  # Triton's interpreter, on the CPU: nothing runs beside anything
            yield
            return
        if self.side is None:
            self.side = torch.cuda.Stream(device)
        self.side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self.side):
            yield

    def join(self, device: torch.device) -> None:
        """The current stream waits for the work launched `beside` it."""
        if device.type == "cuda":
            torch.cuda.current_stream(device).wait_stream(self.side)

    def take_shrunk(self, rows: int, width: int) -> torch.Tensor:
        """The next zeroed [rows, width] of this step's scratch, for one BGMV call."""
        start, self.shrunk_used = self.shrunk_used, self.shrunk_used + rows * width
        if self.shrunk_used > self.token_slots.numel() * self.shrunk_width:
            raise RuntimeError("the LoRA layers took more of a decode step's BGMV scratch than they reserved "
                               "(a layer ran more often per step than its reserve_shrunk says)")
        return self.shrunk[start : self.shrunk_used].view(rows, width)


def write_lora_part(part: Part, a_view: torch.Tensor, b_view: torch.Tensor, a_full, b_full, rank: int, tp: int,
                    read: Callable[[object], torch.Tensor]) -> None:
    """Place this rank's share of one part's full A [r, in] and B [out, r] into a slot.

    a_view: [max_rank, in_local] for this part; b_view: [rows of part.target, max_rank]. A column-
    parallel part (split on dim 0) keeps A whole and its own rows of B (all of them for rows kept whole on
    every rank); a row-parallel part (dim 1) keeps its own columns of A and B whole. `a_full` and `b_full`
    are indexed first and `read` gives the values of what this rank keeps, so a rank reads its share only.
    """
    r = a_full.shape[0]
    for _, full, local in part.pieces(rank, tp):
        if part.splits_output:
            b_view[local, :r] = read(b_full[full])
        else:
            a_view[:r, local] = read(a_full[:, full])
    if part.splits_output:
        a_view[:r] = read(a_full)
    else:
        b_view[:, :r] = read(b_full)


class LoRALinear:
    """LoRA for a 2D linear (column or row): y += (x·Aᵀ)·Bᵀ per token group, B pre-scaled."""

    weight: torch.Tensor
    lora_a: torch.Tensor | None = None  # [max_loras, parts, max_rank, in_local]
    lora_b: torch.Tensor | None = None  # [max_loras, out_local, max_rank]

    def lora_parts(self) -> list[Part]:
        """Parts an adapter's tensors are written into (in slot order)."""
        return [p for p in self.parts() if p.lora]

    def enable_lora(self, max_loras: int, max_rank: int, batch: LoRABatch, tp_size: int) -> None:
        parts = self.lora_parts()
        out_local, in_local = self.weight.shape
        self.lora_batch = batch
        batch.reserve_shrunk(len(parts) * max_rank)
        self.lora_a = torch.zeros(max_loras, len(parts), max_rank, in_local, dtype=self.weight.dtype, device=self.weight.device)
        self.lora_b = torch.zeros(max_loras, out_local, max_rank, dtype=self.weight.dtype, device=self.weight.device)
        self.lora_rows = [
            (p.offset, p.offset + sum(b.local_size(tp_size) for b in p.blocks)) if p.splits_output else (0, out_local)
            for p in parts
        ]
        self.lora_row_part = torch.full((out_local,), -1, dtype=torch.int32, device=self.weight.device)
        for index, (start, stop) in enumerate(self.lora_rows):
            self.lora_row_part[start:stop] = index

    def lora_slot(self, slot: int) -> list[torch.Tensor]:
        """The tensors holding one slot (an adapter's whole share of this layer)."""
        return [self.lora_a[slot], self.lora_b[slot]]

    def lora_views(self, tensors: list[torch.Tensor], part: Part) -> tuple[torch.Tensor, torch.Tensor]:
        """Where `part`'s A and B go inside one slot's tensors (`lora_slot`, or a host copy shaped like it)."""
        index = [p.key for p in self.lora_parts()].index(part.key)
        return tensors[0][index], tensors[1]

    def base_linear(self, x: torch.Tensor) -> torch.Tensor:
        """x·Wᵀ [tokens, out_local], the base model's GEMM."""
        return F.linear(x, self.weight)

    def lora_linear(self, x: torch.Tensor) -> torch.Tensor:
        """x·Wᵀ [tokens, out_local] (before any all-reduce), plus each token's adapter delta."""
        batch = self.lora_batch if self.lora_a is not None else None
        if batch is None or not batch.per_token:
            y = self.base_linear(x)
            if batch is not None and batch.sorted_rows is not None:
                from hylo.kernels.triton_grouped import lora_sgmv

                lora_sgmv(x, y, self.lora_a, self.lora_b, self.lora_row_part, batch.sorted_rows)
            elif batch is not None and batch.groups:
                from hylo.kernels.reference import lora_delta

                lora_delta(x, y, self.lora_a, self.lora_b, self.lora_rows, batch.groups)
            return y
        from hylo.kernels.triton_lora import lora_expand, lora_shrink

        # A decode step's shrink reads only x: it runs on a second stream beside the base GEMM, so that its latency
        # (a few µs of dependent loads and atomics, ~128 times a 9B step) hides behind the GEMM's; the expand, which
        # adds into the GEMM's output, waits for both. Inside a captured step the two streams are a fork and a join.
        shrunk = batch.take_shrunk(x.shape[0], self.lora_a.shape[1] * self.lora_a.shape[2])
        with batch.beside(x.device):
            lora_shrink(x, self.lora_a, batch.token_slots, shrunk)
        y = self.base_linear(x)
        batch.join(x.device)
        lora_expand(shrunk, y, self.lora_b, self.lora_row_part, batch.token_slots)
        return y

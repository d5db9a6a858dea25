"""Declarations of the checkpoint tensors a layer owns, and how each is split across TP ranks.

Every tensor that comes from a checkpoint (or, later, an adapter) is described once, here, by the
layer that owns it: its name as checkpoints and PEFT spell it, its blocks along the split dimension,
and where its rows land in the layer's own (possibly fused) parameter. Loading, LoRA packing, LoRA
sharding and the check-adapter report are all derived from these declarations; there is no second
table of names anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class ShardError(ValueError):
    """A model or adapter dimension cannot be split over the requested number of ranks."""


@dataclass(frozen=True)
class Block:
    """A contiguous run of rows along the split dimension, split across ranks in whole units.

    `unit` is the smallest piece that must stay on one rank (a head: `head_dim` rows, or
    `2*head_dim` for attention's interleaved query+gate). When there are fewer units than ranks and
    `replicable` is set (KV heads), each unit is copied to `tp // units` consecutive ranks.
    """

    name: str
    size: int
    unit: int = 1
    replicable: bool = False

    @property
    def units(self) -> int:
        return self.size // self.unit

    def check(self, tp: int, owner: str) -> None:
        if self.size % self.unit:
            raise ShardError(f"{owner}: block '{self.name}' has {self.size} rows, not a multiple of {self.unit}")
        if self.units % tp == 0:
            return
        if self.replicable and tp % self.units == 0:
            return
        works = [n for n in range(1, 65) if self.units % n == 0 or (self.replicable and n % self.units == 0)]
        raise ShardError(
            f"{owner}: block '{self.name}' has {self.units} units of {self.unit} rows, which cannot be split "
            f"over tensor_parallel_size={tp}; sizes that work: {', '.join(map(str, works[:8]))}"
        )

    def local_size(self, tp: int) -> int:
        if self.units % tp == 0:
            return self.size // tp
        return self.unit  # replicated: one unit per rank

    def shard(self, rank: int, tp: int) -> slice:
        """Rows of this block kept by `rank`, in block-local coordinates."""
        n = self.local_size(tp)
        if self.units % tp == 0:
            return slice(rank * n, (rank + 1) * n)
        unit_index = rank // (tp // self.units)
        return slice(unit_index * self.unit, (unit_index + 1) * self.unit)


def heads(name: str, num_heads: int, head_dim: int, replicable: bool = False) -> Block:
    return Block(name, num_heads * head_dim, unit=head_dim, replicable=replicable)


def whole(name: str, size: int) -> Block:
    """Rows every rank keeps whole (the MoE router inside a fused column layer): one unit, copied to every rank."""
    return Block(name, size, unit=size, replicable=True)


@dataclass(frozen=True)
class Part:
    """One checkpoint tensor (or a PEFT target) inside a layer's parameter.

    `key` is its name relative to the owning module's parent, as checkpoints spell it
    ("in_proj_z.weight", "A_log", "experts.3.gate_proj.weight"). `module` is the name adapters use for
    it, and `lora` how PEFT reaches it: "module" (a linear in `target_modules`), "parameter" (a 3D
    expert tensor in `target_parameters`), "expert" (one expert's linear, a form some trainers write
    but PEFT on today's fused experts never does), or None when hylo applies no LoRA to it.
    Its rows (along `dim`) are `blocks`; an empty `blocks` means the tensor is replicated on every rank.
    On this rank, the kept rows land in `target` along the same `dim`,
    starting at `offset` (a fused parameter holds several parts one after another).
    """

    key: str
    target: torch.Tensor
    blocks: tuple[Block, ...] = ()
    dim: int = 0
    offset: int = 0
    module: str | None = None
    lora: str | None = None

    @property
    def size(self) -> int:
        return sum(b.size for b in self.blocks)

    @property
    def splits_output(self) -> bool:
        """Split along the weight's output rows (column-parallel) rather than its input (row-parallel)."""
        return bool(self.blocks) and self.dim == self.target.dim() - 2

    def pieces(self, rank: int, tp: int) -> list[tuple[Block, slice, slice]]:
        """For each block: (block, rows in the full tensor, rows in the local target)."""
        out, start, local = [], 0, self.offset
        for b in self.blocks:
            s = b.shard(rank, tp)
            out.append((b, slice(start + s.start, start + s.stop), slice(local, local + s.stop - s.start)))
            start += b.size
            local += s.stop - s.start
        return out

    def full_shape(self) -> list[int]:
        """The checkpoint tensor's shape: the target's, with the split dimension at full size."""
        shape = list(self.target.shape)
        if self.blocks:
            shape[self.dim] = self.size
        return shape

    def load(self, tensor: torch.Tensor, rank: int, tp: int, name: str) -> int:
        """Copy this rank's rows of the full tensor `name` into the target; returns elements written."""
        if list(tensor.shape) != self.full_shape():
            raise ValueError(
                f"{name}: the checkpoint has shape {list(tensor.shape)}, the model expects "
                f"{self.full_shape()} (is this checkpoint for another model size?)"
            )
        if not self.blocks:
            self.target.copy_(tensor)
            return tensor.numel()
        written = 0
        for _, full_rows, local_rows in self.pieces(rank, tp):
            src = tensor.narrow(self.dim, full_rows.start, full_rows.stop - full_rows.start)
            self.target.narrow(self.dim, local_rows.start, local_rows.stop - local_rows.start).copy_(src)
            written += src.numel()
        return written


def check_parts(parts: list[Part], tp: int, owner: str) -> None:
    for p in parts:
        for b in p.blocks:
            b.check(tp, f"{owner}{p.key}")


def local_total(blocks: tuple[Block, ...] | list[Block], tp: int) -> int:
    return sum(b.local_size(tp) for b in blocks)


def declared(model) -> list[tuple[str, str, object, Part]]:
    """(full name of the part's key, owning module path, the module, part) for every part the model declares.

    A part's key is relative to its owning module's parent, whose path mirrors the checkpoint's.
    """
    out = []
    for path, module in model.named_modules():
        if hasattr(module, "parts"):
            parent = path.rpartition(".")[0]
            out += [(f"{parent}.{part.key}" if parent else part.key, path, module, part) for part in module.parts()]
    return out

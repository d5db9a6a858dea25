"""An adapter's 2-D tensor, read only where it is indexed: each tensor-parallel rank reads its own rows or columns
of a safetensors file (its slices), not the whole file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch


def all_finite(values: torch.Tensor) -> bool:
    """Whether `values` hold no NaN or infinity. The extremes propagate NaN and show ±inf: one reduction, several times
    faster than isfinite().all() on the host (this runs over every value of every adapter read)."""
    return values.numel() == 0 or all(torch.isfinite(v) for v in torch.aminmax(values))


def _as_slice(r: range) -> slice:
    return slice(r.start, r.stop, r.step)


@dataclass(frozen=True)
class LazyTensor:
    """Rows `rows` and columns `cols` of a stored [height, width] tensor, times `scale` (applied in float32 and
    rounded back, as PEFT's scaling of B: `values`). `fetch(rows, cols)` reads a block of the stored tensor."""

    fetch: Callable[[slice, slice], torch.Tensor]
    rows: range
    cols: range
    module: str  # for messages: the PEFT module, e.g. base_model.model.model.layers.0.mlp.up_proj
    matrix: str  # lora_A or lora_B
    scale: float = 1.0

    @staticmethod
    def stored(fetch: Callable[[slice, slice], torch.Tensor], shape: list[int], module: str, matrix: str) -> LazyTensor:
        return LazyTensor(fetch, range(shape[0]), range(shape[1]), module, matrix)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), len(self.cols)))

    def __getitem__(self, index: slice | tuple[slice, slice]) -> LazyTensor:
        rows, cols = index if isinstance(index, tuple) else (index, slice(None))
        return replace(self, rows=self.rows[rows], cols=self.cols[cols])

    def scaled(self, factor: float) -> LazyTensor:
        return replace(self, scale=self.scale * factor)

    def read(self) -> torch.Tensor:
        """The stored values, before `scale`: a view of the file's mapping (nothing copied) where the file allows."""
        return self.fetch(_as_slice(self.rows), _as_slice(self.cols))

    def values(self) -> torch.Tensor:
        """read() times `scale`, in float32 and rounded back; a new tensor (never the file's values changed in place)."""
        values = self.read()
        return values if self.scale == 1.0 else values.to(torch.float32, copy=True).mul_(self.scale).to(values.dtype)

    def non_finite(self, values: torch.Tensor) -> str | None:
        """Why `values` (read from this tensor) cannot serve, if they hold NaN or infinity."""
        if all_finite(values):
            return None
        return (
            f"{self.matrix} holds NaN or infinite values (a diverged training run or a broken export?), which would turn the "
            "output of every request using it into NaN; re-export it from a checkpoint with finite weights"
        )

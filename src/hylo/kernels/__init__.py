"""The one place where a kernel is chosen for each operation on a device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from hylo.kernels import reference


@dataclass(frozen=True)
class Ops:
    paged_attention: Callable
    causal_conv1d: Callable
    gated_delta_rule: Callable


def select_ops(device: torch.device) -> Ops:
    """Kernels for `device`. The torch reference runs anywhere and is the oracle for faster kernels."""
    return Ops(
        paged_attention=reference.paged_attention,
        causal_conv1d=reference.causal_conv1d,
        gated_delta_rule=reference.gated_delta_rule,
    )

"""The one place where a kernel is chosen for each operation on a device."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from hylo.kernels import batched, reference


@dataclass(frozen=True)
class Ops:
    paged_attention: Callable
    causal_conv1d: Callable
    gated_delta_rule: Callable


def select_ops(device: torch.device) -> Ops:
    """CPU: the torch reference (the oracle for every faster kernel). CUDA: batched torch decode paths,
    and fla-core's gated-delta-rule kernels when the `cuda` extra is installed."""
    if device.type != "cuda":
        return Ops(reference.paged_attention, reference.causal_conv1d, reference.gated_delta_rule)
    gdn = reference.gated_delta_rule
    if importlib.util.find_spec("fla") is not None:
        from hylo.kernels import fla_gdn

        gdn = fla_gdn.gated_delta_rule
    return Ops(batched.paged_attention, batched.causal_conv1d, gdn)

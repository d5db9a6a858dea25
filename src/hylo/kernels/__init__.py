"""The one place where a kernel is chosen for each operation on a device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from hylo.kernels import gpu, reference


@dataclass(frozen=True)
class Ops:
    paged_attention: Callable
    causal_conv1d: Callable
    gated_delta_rule: Callable
    rms_norm: Callable
    gated_rms_norm: Callable
    norm_rope: Callable
    routed_experts: Callable
    route: Callable
    silu_mul: Callable


def select_ops(device: torch.device) -> Ops:
    """CPU: the torch reference (the oracle for every faster kernel). CUDA: Triton kernels for decode steps, norms,
    the MoE router, routed experts (the gated shared expert joins their last launch), and the MLP's activation; SDPA and fla-core (the `cuda`
    extra) for prefill."""
    if device.type != "cuda":
        return Ops(reference.paged_attention, reference.causal_conv1d, reference.gated_delta_rule, reference.rms_norm,
                   reference.gated_rms_norm, reference.norm_rope, reference.routed_experts, reference.route,
                   reference.silu_mul)
    from hylo.kernels import triton_activations, triton_moe, triton_norms

    return Ops(gpu.paged_attention, gpu.causal_conv1d, gpu.gated_delta_rule, triton_norms.rms_norm, triton_norms.gated_rms_norm,
               triton_norms.norm_rope, triton_moe.routed_experts, triton_moe.route, triton_activations.silu_mul)

"""Elementwise activations as single Triton launches (torch's `F.silu(gate) * up` is two or three kernels, and at
batch 1 a step's time goes to launches, not bytes)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(gate_ptr, gate_row, up_ptr, up_row, out_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(gate_ptr + row * gate_row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_row + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + cols, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`reference.silu_mul` in one launch, float32 inside and one rounding (torch rounds after the SiLU too).
    gate, up: [..., n] with the last dim contiguous, e.g. the two halves of a fused gate/up projection's output."""
    n = gate.shape[-1]
    gate2, up2 = gate.reshape(-1, n), up.reshape(-1, n)  # views for the halves of a [rows, 2·n] tensor
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    block = min(1024, triton.next_power_of_2(n))
    grid = (gate2.shape[0], triton.cdiv(n, block))
    _silu_mul_kernel[grid](gate2, gate2.stride(0), up2, up2.stride(0), out, n, BLOCK=block)
    return out

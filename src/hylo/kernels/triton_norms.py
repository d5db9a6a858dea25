"""RMS norms as single Triton launches (the torch forms take 8-10 kernels each, which dominates a decode step).

Same contracts as `reference.rms_norm` and `reference.gated_rms_norm`: float32 inside, one rounding at
the end, and the residual sum rounded to the activation dtype before it is normalised, as the
reference's separate `x + h` would be.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, x_row, x_head, heads, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + (row // heads) * x_row + (row % heads) * x_head + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x = x + tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
        x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (x * rstd * (1.0 + w)).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x: [..., heads?, dim] whose last dim is contiguous; returns norm(x [+ residual]) and, with a residual, the sum."""
    dim = x.shape[-1]
    rows = x.numel() // dim
    heads = x.shape[-2] if x.dim() == 3 else 1
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    row_stride = x.stride(0)
    head_stride = x.stride(1) if x.dim() == 3 else 0
    _rms_norm_kernel[(rows,)](
        x, row_stride, head_stride, heads, residual if residual is not None else x, weight, out, res_out, dim, eps,
        HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(dim), num_warps=8 if dim >= 2048 else 4,
    )
    return out if residual is None else (out, res_out)


@triton.jit
def _norm_rope_kernel(x_ptr, x_row, x_head, heads, w_ptr, pos_ptr, freq_ptr, out_ptr, eps,
                      D: tl.constexpr, HALF: tl.constexpr):
    row = tl.program_id(0)
    t = row // heads
    base = x_ptr + t * x_row + (row % heads) * x_head
    d = tl.arange(0, D)
    x = tl.load(base + d).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    y = x * rstd * (1.0 + tl.load(w_ptr + d).to(tl.float32))
    # Rotating pairs (i, i + HALF) among the first 2·HALF channels: read each channel's partner directly.
    rotating = d < 2 * HALF
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    y_partner = tl.load(base + partner, mask=rotating, other=0.0).to(tl.float32) * rstd * (1.0 + tl.load(w_ptr + partner, mask=rotating, other=0.0).to(tl.float32))
    angle = tl.load(pos_ptr + t).to(tl.float32) * tl.load(freq_ptr + d % HALF, mask=rotating, other=0.0)
    rotated = y * tl.cos(angle) + tl.where(d < HALF, -y_partner, y_partner) * tl.sin(angle)
    tl.store(out_ptr + row * D + d, tl.where(rotating, rotated, y).to(out_ptr.dtype.element_ty))


def norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """`reference.norm_rope` in one launch: x [tokens, heads, D], a per-head row view (last dim contiguous)."""
    tokens, heads, dim = x.shape
    out = torch.empty(tokens, heads, dim, dtype=x.dtype, device=x.device)
    _norm_rope_kernel[(tokens * heads,)](x, x.stride(0), x.stride(1), heads, weight, positions, inv_freq, out, eps, D=dim, HALF=inv_freq.numel())
    return out


@triton.jit
def _gated_rms_norm_kernel(x_ptr, gate_ptr, gate_row, w_ptr, out_ptr, heads, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + (row // heads) * gate_row + (row % heads) * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    normed = x * tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(out_ptr + row * n_cols + cols, (w * normed * g * tl.sigmoid(g)).to(out_ptr.dtype.element_ty), mask=mask)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [tokens, heads, dim] contiguous; gate: same shape, rows of a wider tensor (the fused projection's z)."""
    tokens, heads, dim = x.shape
    out = torch.empty_like(x)
    _gated_rms_norm_kernel[(tokens * heads,)](
        x.contiguous(), gate, gate.stride(0), weight, out, heads, dim, eps, BLOCK=triton.next_power_of_2(dim)
    )
    return out

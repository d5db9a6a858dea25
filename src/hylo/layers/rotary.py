"""Partial rotary embedding: the first `rotary_dim` channels of each head rotate, the rest pass through.

Qwen3.5's multimodal rope uses the same position on its three axes for text, which makes it the
plain rope computed here.
"""

from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    def __init__(self, head_dim: int, partial_factor: float, theta: float):
        super().__init__()
        self.rotary_dim = int(head_dim * partial_factor)
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float) / self.rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [tokens, rotary_dim], computed in float32 then cast like the reference."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [tokens, heads, head_dim]."""
        rot, keep = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        half = self.rotary_dim // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        rot = rot * cos[:, None, :] + rotated * sin[:, None, :]
        return torch.cat((rot, keep), dim=-1)

"""Partial rotary embedding: the frequencies of the first `rotary_dim` channels of each head (the rotation
itself is applied with the q/k norm, `Ops.norm_rope`).

Qwen3.5's multimodal rope uses the same position on its three axes for text, which makes it the
plain rope.
"""

from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    def __init__(self, head_dim: int, partial_factor: float, theta: float):
        super().__init__()
        rotary_dim = int(head_dim * partial_factor)
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

"""Tokens a step sampled on the device that the next step takes as inputs before the host has read them (async
scheduling): the host's step input holds a placeholder there, filled on the device just before the forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hylo.batch import device_tensor


@dataclass(frozen=True)
class PendingTokens:
    tokens: torch.Tensor  # [rows of the previous step] on the device
    rows: list[int]  # the previous step's row for each filled position
    positions: list[int]  # where each goes in this step's input ids

    def fill(self, input_ids: torch.Tensor) -> None:
        device = input_ids.device
        tokens = self.tokens.index_select(0, device_tensor(self.rows, device))
        input_ids.index_copy_(0, device_tensor(self.positions, device), tokens.to(input_ids.dtype))

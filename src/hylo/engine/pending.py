"""Tokens a step sampled on the device that the next step takes as inputs before the host has read them (async
scheduling): the step input lists (row of the last step's tokens, position in this step's input ids) pairs, and
holds a placeholder at each position, filled on the device just before the forward."""

from __future__ import annotations

import torch

from hylo.batch import device_tensor


def fill_pending(input_ids: torch.Tensor, tokens: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    """input_ids[position] = tokens[row] for each (row, position), on the device."""
    device = input_ids.device
    rows, positions = (list(column) for column in zip(*pairs))
    input_ids.index_copy_(0, device_tensor(positions, device), tokens.index_select(0, device_tensor(rows, device)).to(input_ids.dtype))

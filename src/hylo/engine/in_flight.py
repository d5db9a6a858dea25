"""A step whose tokens were sampled on the device and are being copied back while the next step runs (async
scheduling): the host learns them one step late, and the next step takes them as inputs on the device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hylo.engine.scheduler import Scheduled
from hylo.sampling import SampleInput


@dataclass
class InFlight:
    items: list[Scheduled]  # the sampled items, in row order
    tokens: torch.Tensor  # [rows] on the device
    host: torch.Tensor  # [2, rows]: the tokens and whether each row's logits were finite, copied back asynchronously
    copied: torch.cuda.Event | None  # recorded after the copy (None on the CPU, where it is done at once)

    @staticmethod
    def start(logits: torch.Tensor, items: list[Scheduled], inputs: list[SampleInput],
              sample_on_device: Callable[[torch.Tensor, list[SampleInput]], torch.Tensor]) -> InFlight:
        """Sample on the device (`sample_on_device`, the engine's: tokens and whether each row was finite) and start
        copying them back; nothing is changed if sampling raises. A row that was not finite fails when it is read back,
        as the synchronous path fails it."""
        both = sample_on_device(logits, inputs)
        tokens = both[0]
        cuda = logits.is_cuda
        host = torch.empty(both.shape, dtype=both.dtype, pin_memory=cuda)
        host.copy_(both, non_blocking=cuda)
        copied = None
        if cuda:
            copied = torch.cuda.Event()
            copied.record()
        for item in items:
            item.seq.pending += 1
        return InFlight(items, tokens, host, copied)

    def inputs_for(self, step: list[Scheduled]) -> list[tuple[int, int]]:
        """(row here, position in `step`'s input ids) for each input that is a token of this step (a sequence's one
        pending token)."""
        row_of = {id(item.seq): r for r, item in enumerate(self.items)}
        pairs, offset = [], 0
        for item in step:
            seq = item.seq
            last = seq.num_tokens - 1  # the pending token is the sequence's last
            if id(seq) in row_of and seq.pending and seq.num_computed <= last < seq.num_computed + item.num_tokens:
                pairs.append((row_of[id(seq)], offset + last - seq.num_computed))
            offset += item.num_tokens
        return pairs

    def results(self) -> list[tuple[Scheduled, int, bool]]:
        """(item, token, finite) per row, once the copy has landed."""
        if self.copied is not None:
            self.copied.synchronize()
        tokens, finite = self.host.tolist()
        return [(item, token, bool(ok)) for item, token, ok in zip(self.items, tokens, finite)]

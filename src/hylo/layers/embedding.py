"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous range of the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hylo.distributed import TPGroup
from hylo.layers.parts import Block, Part, check_parts


class VocabEmbedding(nn.Module):
    def __init__(self, name: str, vocab_size: int, hidden_size: int, tp: TPGroup, owner: str = ""):
        super().__init__()
        self.name = name
        self.tp = tp
        self.block = Block("vocab", vocab_size)
        self.weight = nn.Parameter(torch.empty(self.block.local_size(tp.size), hidden_size), requires_grad=False)
        check_parts(self.parts(), tp.size, owner)
        self.vocab_start = self.block.shard(tp.rank, tp.size).start

    def parts(self) -> list[Part]:
        return [Part(f"{self.name}.weight", self.weight, (self.block,), 0, module=self.name)]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return out.masked_fill(outside[:, None], 0)  # this rank's partial sum: the first norm reduces it


class LMHead(nn.Module):
    """Logits for the full vocabulary on the driver (rank 0), which samples: each rank's vocabulary slice, gathered."""

    def __init__(self, embedding: VocabEmbedding, tied: bool, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.block = embedding.block
        self.tied_to = [embedding] if tied else None  # a list keeps it out of this module's parameters
        if not tied:
            self.weight = nn.Parameter(torch.empty_like(embedding.weight), requires_grad=False)

    def parts(self) -> list[Part]:
        return [] if self.tied_to else [Part("lm_head.weight", self.weight, (self.block,), 0, module="lm_head")]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.tied_to[0].weight if self.tied_to else self.weight
        return self.tp.gather_last_to_driver(F.linear(hidden, weight))

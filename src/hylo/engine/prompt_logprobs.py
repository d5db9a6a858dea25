"""Prompt logprobs (vLLM's `SamplingParams.prompt_logprobs`): the logprob of each prompt token given the tokens before it.

The logits at prompt position p give the logprob of prompt token p + 1, so a prefill chunk over positions
[start, stop) contributes rows for the positions in [start, min(stop, prompt length - 1)). Only those rows
are gathered (`StepInput.logits_indices`, after the sampled rows), only for requests that ask, and only by
one of a request's n sequences; a chunk recomputed after preemption adds nothing already recorded. The
result is vLLM's shape: None for the first prompt token, then one dict token → Logprob per position.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hylo.engine.scheduler import Scheduled
from hylo.outputs import Logprob


def prompt_positions(item: Scheduled) -> range:
    """The positions of this step's tokens of `item` whose logits are wanted for prompt logprobs."""
    seq, request = item.seq, item.seq.request
    if request.prompt_logprobs is None or seq.child != 0:
        return range(0)
    recorded = len(request.prompt_logprobs) - 1  # positions done (the first entry is the first token's None)
    if seq.num_computed > recorded and recorded < len(request.prompt_ids) - 1:
        # Positions skipped without their logits (a prefix-cache hit): the entries would shift. The scheduler must
        # not reuse cached state for a request that asks for prompt logprobs.
        raise RuntimeError(f"request {request.request_id}: prompt logprobs need every prompt position computed, but positions "
                           f"{recorded} to {seq.num_computed - 1} were not")
    return range(max(seq.num_computed, recorded), min(seq.num_computed + item.num_tokens, len(request.prompt_ids) - 1))


def record_prompt_logprobs(items: list[Scheduled], positions: list[range], logits: torch.Tensor,
                           decode: Callable[[int], str | None]) -> None:
    """Append each request's entries for `positions`, whose logits are `logits`' rows in order ([rows, vocab] float32)."""
    at = 0
    for item, rows in zip(items, positions):
        if not rows:
            continue
        request = item.seq.request
        request.prompt_logprobs += logprob_entries(logits[at : at + len(rows)], request.prompt_ids[rows.start + 1 : rows.stop + 1],
                                                   request.params.prompt_logprobs, decode)
        at += len(rows)


ROWS_AT_ONCE = 256  # a long prefill chunk's rows are turned into logprobs this many at a time: bounded temporaries


def logprob_entries(logits: torch.Tensor, targets: list[int], k: int, decode: Callable[[int], str | None]) -> list[dict[int, Logprob]]:
    """Per row, the target token's Logprob first (with its rank), then the k most likely (rank 1 first)."""
    entries = []
    for start in range(0, len(targets), ROWS_AT_ONCE):
        entries += _entries(logits[start : start + ROWS_AT_ONCE], targets[start : start + ROWS_AT_ONCE], k, decode)
    return entries


def _entries(logits: torch.Tensor, targets: list[int], k: int, decode: Callable[[int], str | None]) -> list[dict[int, Logprob]]:
    logprobs = logits.log_softmax(dim=-1)  # [rows, vocab]
    target = torch.tensor(targets, device=logits.device)[:, None]
    chosen = logprobs.gather(1, target)[:, 0]
    ranks = (logprobs > chosen[:, None]).sum(dim=-1) + 1
    top = logprobs.topk(min(k, logprobs.shape[1]), dim=-1)
    entries = []
    for token, lp, rank, top_ids, top_lps in zip(targets, chosen.tolist(), ranks.tolist(), top.indices.tolist(), top.values.tolist()):
        entry = {token: Logprob(lp, rank, decode(token))}
        for r, (t, v) in enumerate(zip(top_ids, top_lps)):
            entry.setdefault(t, Logprob(v, r + 1, decode(t)))
        entries.append(entry)
    return entries

"""Fast kernels against the torch reference on fresh random inputs: ragged batches, fresh and continuing sequences."""

import pytest
import torch

from hylo.batch import StepInput
from hylo.kernels import batched, reference

BLOCK = 4


def decode_step(context_lens: list[int], device="cpu") -> StepInput:
    """One token per sequence on top of `context_lens` cached tokens; blocks shuffled so tables matter."""
    perm = torch.randperm(64).tolist()
    tables, slots, start = [], [], 0
    for n in context_lens:
        blocks = perm[start : start + n // BLOCK + 1]
        start += len(blocks)
        tables.append(blocks)
        slots.append(blocks[n // BLOCK] * BLOCK + n % BLOCK)
    m = len(context_lens)
    return StepInput(
        input_ids=[0] * m, positions=list(context_lens), query_lens=[1] * m, context_lens=list(context_lens),
        state_slots=torch.randperm(8)[:m].tolist(), block_tables=tables, slot_mapping=slots,
        logits_indices=list(range(m)), lora_slots=[-1] * m,
    )


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_batched_decode_attention_equals_reference(dtype, tol):
    torch.manual_seed(0)
    batch = decode_step([0, 5, 17, 3, 30]).to_batch(torch.device("cpu"))
    q, k, v = torch.randn(5, 4, 16, dtype=dtype), torch.randn(5, 2, 16, dtype=dtype), torch.randn(5, 2, 16, dtype=dtype)
    cache = torch.randn(2, 64, BLOCK, 2, 16, dtype=dtype)
    ref_cache = cache.clone()
    got = batched.paged_attention(q, k, v, cache, batch, 0.25)
    ref = reference.paged_attention(q, k, v, ref_cache, batch, 0.25)
    assert torch.equal(cache, ref_cache)
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


def test_batched_decode_conv_equals_reference():
    torch.manual_seed(1)
    batch = decode_step([2, 9, 1]).to_batch(torch.device("cpu"))
    x, w = torch.randn(3, 24), torch.randn(24, 4)
    states = torch.randn(8, 24, 3)
    ref_states = states.clone()
    torch.testing.assert_close(batched.causal_conv1d(x, w, states, batch), reference.causal_conv1d(x, w, ref_states, batch))
    torch.testing.assert_close(states, ref_states)


def test_prefill_steps_fall_back_to_the_reference():
    """A step with a fresh sequence is not a decode step: the batched kernels must give the reference's result."""
    torch.manual_seed(3)
    step = decode_step([0, 6])
    batch = step.to_batch(torch.device("cpu"))
    assert not batch.is_decode
    x, w, states = torch.randn(2, 24), torch.randn(24, 4), torch.randn(8, 24, 3)
    torch.testing.assert_close(batched.causal_conv1d(x, w, states.clone(), batch), reference.causal_conv1d(x, w, states.clone(), batch))
    q, k, v = torch.randn(2, 4, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    cache = torch.randn(2, 64, BLOCK, 2, 16)
    torch.testing.assert_close(batched.paged_attention(q, k, v, cache.clone(), batch, 0.25), reference.paged_attention(q, k, v, cache.clone(), batch, 0.25))


def test_chunked_and_recurrent_gated_delta_rule_agree():
    """The reference's own two forms: a chunked prefill of n tokens equals n recurrent steps."""
    torch.manual_seed(2)
    n, hk, hv, d = 150, 2, 4, 8
    q, k, v = torch.randn(n, hk, d), torch.randn(n, hk, d), torch.randn(n, hv, d)
    g, beta = -torch.rand(n, hv) * 0.3, torch.rand(n, hv)
    whole = StepInput([0] * n, list(range(n)), [n], [0], [3], [[0]], [0] * n, [n - 1], [-1]).to_batch(torch.device("cpu"))
    states = torch.randn(8, hv, d, d)
    out = reference.gated_delta_rule(q, k, v, g, beta, states, whole)
    step_states = torch.zeros(8, hv, d, d)
    steps = []
    for t in range(n):
        one = StepInput([0], [t], [1], [t], [3], [[0]], [0], [0], [-1]).to_batch(torch.device("cpu"))
        steps.append(reference.gated_delta_rule(q[t : t + 1], k[t : t + 1], v[t : t + 1], g[t : t + 1], beta[t : t + 1], step_states, one))
    torch.testing.assert_close(out, torch.cat(steps), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(states[3], step_states[3], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_prefill_from_empty_equals_reference(dtype, tol):
    torch.manual_seed(4)
    lengths = [7, 1, 12]
    n = sum(lengths)
    tables = [[0, 1], [2], [3, 4, 5]]
    slots = [b * BLOCK + p % BLOCK for t, m in zip(tables, lengths) for p, b in ((p, t[p // BLOCK]) for p in range(m))]
    step = StepInput([0] * n, [p for m in lengths for p in range(m)], lengths, [0, 0, 0], [0, 1, 2], tables, slots, [6, 7, 19], [-1] * 3)
    batch = step.to_batch(torch.device("cpu"))
    q, k, v = torch.randn(n, 4, 16, dtype=dtype), torch.randn(n, 2, 16, dtype=dtype), torch.randn(n, 2, 16, dtype=dtype)
    cache = torch.zeros(2, 64, BLOCK, 2, 16, dtype=dtype)
    ref_cache = cache.clone()
    got = batched.paged_attention(q, k, v, cache, batch, 0.25)
    ref = reference.paged_attention(q, k, v, ref_cache, batch, 0.25)
    assert torch.equal(cache, ref_cache)
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)

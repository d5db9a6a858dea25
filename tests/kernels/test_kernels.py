"""Fast kernels against the torch reference on fresh random inputs: ragged batches, fresh and continuing sequences."""

import pytest
import torch

from hylo.batch import StepInput
from hylo.kernels import gpu, reference

BLOCK = 4


def decode_step(context_lens: list[int], block_size: int = BLOCK) -> StepInput:
    """One token per sequence on top of `context_lens` cached tokens; blocks shuffled so tables matter."""
    perm = torch.randperm(64).tolist()
    tables, slots, start = [], [], 0
    for n in context_lens:
        blocks = perm[start : start + n // block_size + 1]
        start += len(blocks)
        tables.append(blocks)
        slots.append(blocks[n // block_size] * block_size + n % block_size)
    m = len(context_lens)
    return StepInput(
        input_ids=[0] * m, positions=list(context_lens), query_lens=[1] * m, context_lens=list(context_lens),
        state_slots=torch.randperm(8)[:m].tolist(), block_tables=tables, slot_mapping=slots,
        logits_indices=list(range(m)), lora_slots=[-1] * m,
    )


def prefill_step(context_lens: list[int], query_lens: list[int]) -> StepInput:
    """`query_lens` new tokens per sequence on top of `context_lens` cached ones; blocks and state slots shuffled."""
    perm = torch.randperm(64).tolist()
    tables, start = [], 0
    for c, n in zip(context_lens, query_lens):
        tables.append(perm[start : start + (c + n - 1) // BLOCK + 1])
        start += len(tables[-1])
    slots = [t[p // BLOCK] * BLOCK + p % BLOCK for t, c, n in zip(tables, context_lens, query_lens) for p in range(c, c + n)]
    positions = [p for c, n in zip(context_lens, query_lens) for p in range(c, c + n)]
    last = [sum(query_lens[: i + 1]) - 1 for i in range(len(query_lens))]
    m = len(query_lens)
    return StepInput([0] * sum(query_lens), positions, list(query_lens), list(context_lens), torch.randperm(8)[:m].tolist(), tables, slots,
                     last, [-1] * m)


def test_gpu_prefill_attention_equals_the_reference():
    """A step that is not a decode step takes no Triton attention path: on the CPU the result equals the reference."""
    torch.manual_seed(3)
    step = decode_step([0, 6])
    batch = step.to_batch(torch.device("cpu"))
    assert not batch.is_decode
    q, k, v = torch.randn(2, 4, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    cache = torch.randn(2, 64, BLOCK, 2, 16)
    torch.testing.assert_close(gpu.paged_attention(q, k, v, cache.clone(), batch, 0.25), reference.paged_attention(q, k, v, cache.clone(), batch, 0.25))


def test_norm_with_residual_equals_the_sum_then_the_norm():
    torch.manual_seed(5)
    x, r, w = torch.randn(6, 32, dtype=torch.bfloat16), torch.randn(6, 32, dtype=torch.bfloat16), torch.randn(32)
    out, total = reference.rms_norm(x, w, 1e-6, r)
    assert torch.equal(total, x + r)
    assert torch.equal(out, reference.rms_norm(x + r, w, 1e-6))


def test_chunked_and_recurrent_gated_delta_rule_agree():
    """The reference's own two forms: a chunked prefill of n tokens equals n recurrent steps."""
    torch.manual_seed(2)
    n, hk, hv, d = 150, 2, 4, 8
    q, k, v = torch.randn(n, hk, d), torch.randn(n, hk, d), torch.randn(n, hv, d)
    g, beta = -torch.rand(n, hv) * 0.3, torch.rand(n, hv)
    whole = StepInput([0] * n, list(range(n)), [n], [0], [3], [[0]], [0] * n, [n - 1], [-1]).to_batch(torch.device("cpu"))
    states = torch.randn(8, hv, d, d)
    out = reference.delta_rule(q, k, v, g, beta, states, whole)
    step_states = torch.zeros(8, hv, d, d)
    steps = []
    for t in range(n):
        one = StepInput([0], [t], [1], [t], [3], [[0]], [0], [0], [-1]).to_batch(torch.device("cpu"))
        steps.append(reference.delta_rule(q[t : t + 1], k[t : t + 1], v[t : t + 1], g[t : t + 1], beta[t : t + 1], step_states, one))
    torch.testing.assert_close(out, torch.cat(steps), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(states[3], step_states[3], atol=1e-4, rtol=1e-4)


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("contexts, lengths", [([0, 0, 0], [7, 1, 12]), ([5, 0, 9], [3, 4, 2]), ([0, 40, 0], [100, 50, 1])],
                         ids=["from-empty", "chunked", "longer"])
def test_prefill_attention_equals_reference(contexts, lengths, dtype, tol, device):
    """Fresh sequences attend to this step's keys; continuing ones (a later prefill chunk) read their history
    from shuffled blocks. Both write the cache exactly as the reference does. On a GPU in bfloat16 this is flash
    attention's varlen kernel (its causal mask must sit at each sequence's lower right), in float32 SDPA."""
    torch.manual_seed(6)
    n = sum(lengths)
    batch = prefill_step(contexts, lengths).to_batch(torch.device(device))
    q, k, v = (torch.randn(n, heads, 16, dtype=dtype, device=device) for heads in (4, 2, 2))
    cache = torch.randn(2, 64, BLOCK, 2, 16, dtype=dtype, device=device)
    ref_cache = cache.clone()
    got = gpu.prefill_attention(q, k, v, cache, batch, 0.25)
    ref = reference.paged_attention(q, k, v, ref_cache, batch, 0.25)
    assert torch.equal(cache, ref_cache)
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)

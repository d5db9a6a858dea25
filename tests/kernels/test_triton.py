"""Each Triton kernel against the torch reference: ragged decode batches, shuffled blocks and slots, mixed adapters.

Marked `gpu`; they run on a CUDA device, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1).
"""

import importlib.util
import os

import pytest
import torch

from hylo.kernels import reference
from tests.kernels.test_kernels import decode_step, prefill_step

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETED), reason="needs CUDA (or Triton's interpreter)")]
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]


def skip_interpreted_bf16_dot(dtype) -> None:
    if dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("Triton's interpreter multiplies bf16 tiles in tl.dot wrongly (checked against torch)")


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEV).to(dtype)


def close(got, ref, dtype):
    torch.testing.assert_close(got.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("splits", [1, 4, None])  # None: as many as the GPU wants, most of them empty here
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the interpreter cannot loop to a loaded bound")
def test_paged_decode_attention(dtype, block_size, splits):
    from hylo.kernels.triton_decode import paged_attention_decode

    torch.manual_seed(0)
    # Short ragged contexts, and contexts that fill one, two and three 256-token chunks, the last one empty.
    contexts = [1, 5, 70, 3, 33, 16] if block_size == 4 else [1, 290, 650, 40]
    step = decode_step(contexts, block_size=block_size)
    batch = step.to_batch(DEV)
    n = len(contexts)
    # q as the strided view the layer passes: [tokens, heads, query | gate]
    q = rand(n, 8, 2 * 32, dtype=dtype)[..., :32]
    k, v = rand(n, 2, 32, dtype=dtype), rand(n, 2, 64, dtype=dtype)[..., :32]
    cache = rand(2, 128, block_size, 2, 32, dtype=dtype)
    ref_cache = cache.clone()
    got = paged_attention_decode(q, k, v, cache, batch, 0.2, splits)
    ref = reference.paged_attention(q, k, v, ref_cache, batch, 0.2)
    assert torch.equal(cache, ref_cache)
    close(got, ref, dtype)


def assert_conv_equals_reference(conv, batch, tokens: int, dtype) -> None:
    """Output and the slots' windows after the step; x a row view of the fused projection."""
    x = rand(tokens, 600, dtype=dtype)[:, 100:400]
    w = rand(300, 4, dtype=dtype)
    states = rand(8, 300, 3, dtype=dtype)
    ref_states = states.clone()
    close(conv(x, w, states, batch), reference.causal_conv1d(x, w, ref_states, batch), dtype)
    close(states, ref_states, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_decode(dtype):
    from hylo.kernels.triton_decode import conv_decode

    torch.manual_seed(1)
    assert_conv_equals_reference(conv_decode, decode_step([2, 9, 1, 4]).to_batch(DEV), 4, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_prefill(dtype):
    """Fresh sequences and continuing ones, among them steps shorter than the conv's window (which then keeps part
    of its old contents)."""
    from hylo.kernels.triton_prefill import conv_prefill

    torch.manual_seed(9)
    lengths = [7, 1, 2, 12, 40]
    assert_conv_equals_reference(conv_prefill, prefill_step([0, 5, 2, 9, 0], lengths).to_batch(DEV), sum(lengths), dtype)


def assert_gdn_equals_reference(kernel, step, dtype) -> None:
    """q, k, v row views of the conv output (q's row stride made to differ), a a row view and b a tensor of its own
    (their strides differ too), two value heads per key head; output and states against the torch reference."""
    batch = step.to_batch(DEV)
    n, hk, hv, dk, dv = len(step.input_ids), 2, 4, 32, 64
    conv = rand(n, 2 * hk * dk + hv * dv, dtype=dtype)
    q, k, v = conv[:, : hk * dk].view(n, hk, dk), conv[:, hk * dk : 2 * hk * dk].view(n, hk, dk), conv[:, 2 * hk * dk :].view(n, hv, dv)
    a, b = rand(n, 3 * hv, dtype=dtype)[:, :hv], rand(n, hv, dtype=dtype)
    q = q.contiguous()
    a_log, dt_bias = rand(hv, dtype=dtype) * 0.5, rand(hv, dtype=dtype)
    states = rand(8, hv, dk, dv) * 0.1
    ref_states = states.clone()
    got = kernel(q, k, v, a, b, a_log, dt_bias, states, batch)
    ref = reference.gated_delta_rule(q, k, v, a, b, a_log, dt_bias, ref_states, batch)
    close(got, ref, dtype)
    close(states, ref_states, dtype)  # bf16: the reference rounds beta to bf16, the kernels keep it in float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_gdn_decode(dtype):
    from hylo.kernels.triton_decode import gdn_decode

    torch.manual_seed(2)
    assert_gdn_equals_reference(gdn_decode, decode_step([3, 9, 40]), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gdn_recurrent_prefill(dtype):
    """Ragged sequences, fresh (from a zero state, whatever the slot holds) and continuing (from the slot's state), one
    of a single token."""
    from hylo.kernels.triton_prefill import gdn_recurrent

    torch.manual_seed(3)
    assert_gdn_equals_reference(gdn_recurrent, prefill_step([0, 5, 0, 12], [37, 1, 70, 5]), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norms(dtype):
    from hylo.kernels import triton_norms

    torch.manual_seed(3)
    x, r, w = rand(5, 96, dtype=dtype), rand(5, 96, dtype=dtype), rand(96, dtype=dtype)
    got, got_sum = triton_norms.rms_norm(x, w, 1e-6, r)
    ref, ref_sum = reference.rms_norm(x, w, 1e-6, r)
    if DEV.type == "cuda" or dtype == torch.float32:  # the interpreter truncates to bf16 instead of rounding
        assert torch.equal(got_sum, ref_sum)
    close(got, ref, dtype)
    heads = rand(5, 4, 2 * 16, dtype=dtype)[..., :16]  # q_norm's input: a strided view per head
    wh = rand(16, dtype=dtype)
    close(triton_norms.rms_norm(heads, wh, 1e-6), reference.rms_norm(heads, wh, 1e-6), dtype)
    z = rand(5, 3 * 64, dtype=dtype)[:, 64:128].view(5, 4, 16)  # the gate: a row view of the fused projection
    close(triton_norms.gated_rms_norm(heads.contiguous(), z, wh, 1e-6), reference.gated_rms_norm(heads.contiguous(), z, wh, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_bgmv_equals_grouped_matmuls(dtype):
    """Mixed slots, base-model tokens (-1), a slot used by no token, rank below the maximum, and three parts."""
    from hylo.kernels.triton_lora import lora_bgmv

    torch.manual_seed(4)
    slots, parts, max_rank, in_f, rows = 4, 3, 16, 1500, [(0, 40), (40, 100), (100, 230)]
    a, b = torch.zeros(slots, parts, max_rank, in_f, device=DEV, dtype=dtype), torch.zeros(slots, 230, max_rank, device=DEV, dtype=dtype)
    for s, rank in [(0, 16), (1, 8), (3, 5)]:  # slot 2 stays empty
        a[s, :, :rank] = rand(parts, rank, in_f, dtype=dtype) * 0.05
        b[s, :, :rank] = rand(230, rank, dtype=dtype)
    token_slots = torch.tensor([1, -1, 0, 3, 1, -1, 0], device=DEV)
    x, y = rand(7, in_f, dtype=dtype), rand(7, 230, dtype=dtype)
    row_part = torch.full((230,), -1, dtype=torch.int32, device=DEV)
    for i, (start, stop) in enumerate(rows):
        row_part[start:stop] = i
    ref = y.clone()
    groups = [(s, torch.where(token_slots == s)[0]) for s in (0, 1, 3)]
    reference.lora_delta(x.float(), ref_f := ref.float(), a.float(), b.float(), rows, groups)
    shrunk = torch.zeros(7, parts * max_rank, device=DEV)
    lora_bgmv(x, y, a, b, row_part, token_slots, shrunk)
    close(y, ref_f, dtype)
    assert torch.equal(y[1], ref[1]) and torch.equal(y[5], ref[5])  # base-model tokens untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_rope(dtype):
    """Per-head norm then partial rotary, on the strided query view and at scattered positions."""
    from hylo.kernels import triton_norms

    torch.manual_seed(5)
    x = rand(6, 4, 2 * 64, dtype=dtype)[..., :64]
    w = rand(64, dtype=dtype)
    positions = torch.tensor([0, 3, 17, 250, 1000, 4095], device=DEV)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float, device=DEV) / 16))  # rotary_dim 16 of 64
    close(triton_norms.norm_rope(x, w, 1e-6, positions, inv_freq), reference.norm_rope(x, w, 1e-6, positions, inv_freq), dtype)


def _experts_with_adapters(dtype, adapters: bool):
    """Six experts, top-2, two adapters (ranks 8 and 3 of 8) in slots 0 and 2, seven tokens: those of both adapters
    and of the base model; expert 2 chosen by none. Returns the layer, the slots and the block's inputs."""
    from hylo.distributed import TPGroup
    from hylo.kernels import select_ops
    from hylo.layers.lora import LoRABatch
    from hylo.layers.moe import Experts

    torch.manual_seed(6)
    with torch.device(DEV):
        layer = Experts(6, 2, 64, 48, TPGroup(), select_ops(DEV), "")
        layer.w13.data = rand(6, 96, 64, dtype=dtype) * 0.2
        layer.w2.data = rand(6, 64, 48, dtype=dtype) * 0.2
    if adapters:
        layer.enable_lora(3, 8, LoRABatch(), 1)
        for slot, rank in [(0, 8), (2, 3)]:
            for t in (layer.lora_a13, layer.lora_a2):
                t[slot, ..., :rank, :] = rand(*t[slot, ..., :rank, :].shape, dtype=dtype) * 0.2
            for t in (layer.lora_b13, layer.lora_b2):
                t[slot, ..., :rank] = rand(*t[slot, ..., :rank].shape, dtype=dtype) * 0.2
    token_slots = torch.tensor([2, -1, 0, 2, 0, 0, 2], device=DEV)
    x = rand(7, 64, dtype=dtype)
    experts = torch.tensor([[1, 4], [4, 0], [5, 1], [1, 0], [3, 4], [4, 1], [0, 5]], device=DEV)
    weights = torch.rand(7, 2, device=DEV).to(dtype)
    shared_gate, shared = rand(7, 1, dtype=dtype) * 3, rand(7, 64, dtype=dtype)
    return layer, token_slots, (x, weights, experts, shared_gate, shared)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["per pair", "grouped"])
@pytest.mark.parametrize("step", ["decode", "prefill"])
@pytest.mark.parametrize("adapters", ["mixed", "none"])  # none: the per-pair path applies the activation inside the down GEMV
def test_routed_experts(dtype, path, step, adapters):
    """Both GPU paths with expert LoRA (BGMV in a decode step, SGMV otherwise), and without, against the reference's
    loop over experts: tokens of two adapters and of the base model, an expert chosen by several tokens, an expert
    chosen by none, ranks below the maximum."""
    from hylo.kernels.triton_grouped import sort_rows
    from hylo.kernels.triton_moe import routed_experts

    if path == "grouped" or step == "prefill":
        skip_interpreted_bf16_dot(dtype)
    layer, token_slots, inputs = _experts_with_adapters(dtype, adapters == "mixed")
    lora = ("lora_a13", "lora_b13", "lora_a2", "lora_b2") if adapters == "mixed" else ()
    if lora:
        layer.lora_batch.start_step(token_slots, step == "decode", None if step == "decode" else sort_rows(token_slots, 3))
    got = routed_experts(layer, *inputs, gemv_pairs=100 if path == "per pair" else 0).float()
    layer.w13.data, layer.w2.data = layer.w13.float(), layer.w2.float()  # the oracle in float32
    for name in lora:
        setattr(layer, name, getattr(layer, name).float())
    x, weights, experts, shared_gate, shared = inputs
    ref = reference.routed_experts(layer, x.float(), weights.float(), experts, shared_gate.float(), shared.float())
    # torch's own bf16 forward is ~0.5% off here; the interpreter truncates to bf16 instead of rounding.
    bound = {torch.float32: 1e-5, torch.bfloat16: 1e-2 if DEV.type == "cuda" else 3e-2}[dtype]
    assert ((got - ref).norm() / ref.norm()).item() < bound


def test_bgmv_scratch_is_zeroed_by_each_decode_step_and_refused_past_what_layers_reserved():
    """The BGMV shrink sums into the step's scratch, zeroed once per step for all layers: the same step twice gives the
    same output, and a layer that runs twice within one step (more than it reserved) is refused, not summed into
    another layer's sums."""
    from hylo.kernels.triton_moe import routed_experts

    layer, token_slots, inputs = _experts_with_adapters(torch.float32, adapters=True)
    layer.lora_batch.start_step(token_slots, per_token=True)
    first = routed_experts(layer, *inputs)
    with pytest.raises(RuntimeError, match="more of a decode step's BGMV scratch than they reserved"):
        routed_experts(layer, *inputs)
    layer.lora_batch.start_step(token_slots, per_token=True)
    assert torch.equal(routed_experts(layer, *inputs), first)


MOE_SHAPES = [(10, 3), (256, 8)]  # (experts, top_k): the tiny test models', Qwen3.5-35B-A3B's
TOKENS = [1, 3, 17]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("experts, top_k", MOE_SHAPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_route(dtype, experts, top_k, tokens):
    from hylo.kernels.triton_moe import route

    torch.manual_seed(9)
    logits = rand(tokens, 2 * experts, dtype=dtype)[:, :experts] * 3  # a row view, as a fused GEMV could give
    weights, ids = route(logits, top_k)
    ref_weights, ref_ids = reference.route(logits, top_k)
    assert weights.dtype == ref_weights.dtype and ids.dtype == ref_ids.dtype
    close(weights, ref_weights, dtype)
    # bf16 logits can tie, and tied experts may then be listed in another order: compare what each choice is worth.
    probs = logits.softmax(dim=-1, dtype=torch.float)
    assert torch.equal(probs.gather(1, ids), probs.gather(1, ref_ids))


@pytest.mark.parametrize("experts, top_k", MOE_SHAPES)
def test_route_ids_equal_topk(experts, top_k):
    """On many random float32 rows (no ties) the ids are torch.topk's, in its order; a tie goes to the lowest id."""
    from hylo.kernels.triton_moe import route

    torch.manual_seed(10)
    logits = rand(300, experts)
    assert torch.equal(route(logits, top_k)[1], logits.softmax(dim=-1, dtype=torch.float).topk(top_k, dim=-1).indices)
    tied = torch.zeros(1, experts, device=DEV)
    tied[0, [7, 2, 5]] = 1.0
    assert route(tied, 3)[1].tolist() == [[2, 5, 7]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k, hidden", [(3, 48), (8, 2048)])
@pytest.mark.parametrize("tokens", TOKENS)
def test_combine_pairs(dtype, top_k, hidden, tokens):
    """The routed pairs' weighted sum plus the shared expert gated by one logit per token (a row view of the fused
    projection's output, as the MoE block passes it)."""
    from hylo.kernels.triton_moe import combine_pairs

    torch.manual_seed(11)
    y, weights = rand(tokens * top_k, hidden, dtype=dtype), torch.rand(tokens, top_k, device=DEV).to(dtype)
    shared, shared_gate = rand(tokens, hidden, dtype=dtype), (rand(tokens, 3, dtype=dtype) * 3)[:, 1:2]
    routed = (y.view(-1, top_k, hidden).float() * weights[..., None].float()).sum(dim=1).to(dtype)
    ref = (routed.float() + torch.sigmoid(shared_gate.float()) * shared.float()).to(dtype)  # one rounding, as the kernel's
    close(combine_pairs(y, weights, shared_gate, shared), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [24, 56, 1500])  # the tiny experts and shared expert; more than one column block
@pytest.mark.parametrize("tokens", TOKENS)
def test_silu_mul(dtype, n, tokens):
    """On the two halves of a fused gate/up output (row views), as the MLP and the experts pass them."""
    from hylo.kernels.triton_activations import silu_mul

    torch.manual_seed(12)
    gate, up = (rand(tokens, 2 * n, dtype=dtype) * 3).chunk(2, dim=-1)
    got = silu_mul(gate, up)
    assert got.shape == gate.shape and got.dtype == dtype
    close(got, reference.silu_mul(gate, up), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_moe_layer_on_fast_ops(dtype):
    """The MoE block wired to the fast router, experts (with the gated shared expert) and SiLU, against the same block on the
    reference ops: the tiny models' shapes, a decode-sized batch (the per-pair path, no tl.dot)."""
    from dataclasses import replace
    from types import SimpleNamespace

    from hylo.distributed import TPGroup
    from hylo.kernels import select_ops, triton_activations, triton_moe
    from hylo.layers.moe import SparseMoE

    torch.manual_seed(14)
    cfg = SimpleNamespace(hidden_size=48, num_experts=10, num_experts_per_tok=3, moe_intermediate_size=24,
                          shared_expert_intermediate_size=56)
    ref_ops = select_ops(torch.device("cpu"))
    fast_ops = replace(ref_ops, route=triton_moe.route, routed_experts=triton_moe.routed_experts, silu_mul=triton_activations.silu_mul)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as the worker builds a model: in its dtype, on its device
    try:
        with torch.device(DEV):
            fast, ref = SparseMoE(cfg, TPGroup(), fast_ops, ""), SparseMoE(cfg, TPGroup(), ref_ops, "")
    finally:
        torch.set_default_dtype(default)
    for p, q in zip(fast.parameters(), ref.parameters()):  # in place: a column layer's GEMM also reads the zero rows after its weight
        p.copy_(rand(*p.shape, dtype=dtype) * 0.3)
        q.copy_(p)
    x = rand(5, 48, dtype=dtype)
    # Both in the same dtype, so both routers see the same logits and pick the same experts.
    got, want = fast(x).float(), ref(x).float()
    bound = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]  # bf16: as test_routed_experts allows
    assert ((got - want).norm() / want.norm()).item() < bound


def test_sort_rows_puts_each_row_once_in_a_block_of_its_group():
    from hylo.kernels.triton_grouped import sort_rows

    torch.manual_seed(7)
    groups = torch.randint(-1, 5, (300,), device=DEV)
    groups[groups == 3] = 4  # a group with no rows
    got = sort_rows(groups, 5)
    rows, block_groups = got.rows.view(-1, got.block), got.block_groups
    assert rows.shape[0] == block_groups.numel()
    for block_rows, group in zip(rows.tolist(), block_groups.tolist()):
        members = [r for r in block_rows if r >= 0]
        assert (group >= 0) == bool(members)
        assert all(groups[r] == group for r in members)
    placed = sorted(r for r in got.rows.tolist() if r >= 0)
    assert placed == torch.where(groups >= 0)[0].tolist()


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_sgmv_equals_grouped_matmuls(dtype):
    """Prefill LoRA: runs of tokens per slot, base-model tokens, a slot used by no token, ranks below the maximum,
    three parts and rows of no part."""
    from hylo.kernels.triton_grouped import lora_sgmv, sort_rows

    skip_interpreted_bf16_dot(dtype)
    torch.manual_seed(8)
    slots, parts, max_rank, in_f, out_f, rows = 4, 3, 16, 300, 240, [(0, 40), (40, 100), (100, 230)]
    a, b = torch.zeros(slots, parts, max_rank, in_f, device=DEV, dtype=dtype), torch.zeros(slots, out_f, max_rank, device=DEV, dtype=dtype)
    for s, rank in [(0, 16), (1, 8), (3, 5)]:  # slot 2 stays empty
        a[s, :, :rank] = rand(parts, rank, in_f, dtype=dtype) * 0.05
        b[s, :230, :rank] = rand(230, rank, dtype=dtype)
    token_slots = torch.tensor([1] * 20 + [-1] * 7 + [0] * 3 + [3] * 40 + [1] * 5, device=DEV)
    x, y = rand(75, in_f, dtype=dtype), rand(75, out_f, dtype=dtype)
    row_part = torch.full((out_f,), -1, dtype=torch.int32, device=DEV)
    for i, (start, stop) in enumerate(rows):
        row_part[start:stop] = i
    ref = y.clone()
    groups = [(s, torch.where(token_slots == s)[0]) for s in (0, 1, 3)]
    reference.lora_delta(x, ref, a, b, rows, groups)
    lora_sgmv(x, y, a, b, row_part, sort_rows(token_slots, slots))
    close(y, ref, dtype)
    base = token_slots < 0
    assert torch.equal(y[base], ref[base]) and torch.equal(y[:, 230:], ref[:, 230:])  # no LoRA there: untouched


def test_route_keeps_ids_in_range_for_non_finite_logits():
    """A row of NaN logits (a broken adapter's hidden states) must still name real experts: the GEMVs index by them."""
    from hylo.kernels import triton_moe

    logits = rand(3, 10)
    logits[1] = float("nan")
    logits[2, 4] = float("inf")
    _, ids = triton_moe.route(logits, 3)
    assert bool(((ids >= 0) & (ids < 10)).all())


SPILL_PROBE = """
import ctypes, torch
from hylo.kernels.triton_grouped import grouped_matmul, sort_rows
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for block in (16, 32, 64):
        for n_out, k_in in ((96, 48), (48, 24), (1024, 2048)):
            groups = torch.randint(0, 5, (300,), device="cuda")
            x, w = torch.randn(300, k_in, device="cuda", dtype=dtype), torch.randn(5, n_out, k_in, device="cuda", dtype=dtype) / k_in**0.5
            out = torch.empty(300, n_out, device="cuda", dtype=dtype)
            grouped_matmul(x, w, out, sort_rows(groups, 5, block=block))
            want = torch.einsum("rok,rk->ro", w[groups].float(), x.float())
            assert (out.float() - want).abs().max().item() < (1e-4 if dtype == torch.float32 else 5e-2), (dtype, block, n_out)
torch.cuda.synchronize()
limit = ctypes.c_size_t()
assert ctypes.CDLL("libcuda.so.1").cuCtxGetLimit(ctypes.byref(limit), 0) == 0  # CU_LIMIT_STACK_SIZE
print(limit.value)
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a compiled kernel's local memory needs CUDA")
def test_grouped_tiles_do_not_grow_the_contexts_stack():
    """A tile that spills makes the CUDA context grow every resident thread's stack, and that memory is never given
    back: float32's 64-row tiles over 4 warps grew it to 6 KiB (1.6 GiB of an H200, kept after shutdown). Probed in a
    fresh process, whose context starts at the default 1 KiB."""
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", SPILL_PROBE], capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert int(probe.stdout.split()[-1]) <= 2048, f"per-thread stack grew to {probe.stdout.split()[-1]} bytes"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [50, 4096, 9000])  # under one block, exactly one, and a ragged last block
def test_greedy_tokens(dtype, vocab):
    """Each row's argmax and finiteness against torch's, on a strided view (the graph's logits rows): ties across
    and within blocks go to the lowest index, and NaN, inf and -inf each flag their row."""
    from hylo.kernels.triton_sampling import greedy_tokens

    torch.manual_seed(0)
    logits = rand(7, vocab + 3, dtype=dtype)[:, :vocab]
    logits[1, [vocab - 1, vocab // 2, 3]] = 9.0  # the same maximum three times, in different blocks where vocab allows
    logits[2, [0, 1]] = 9.0  # a tie within a block
    logits[3, vocab - 1] = 9.0  # the last column, in the ragged block
    logits[4, vocab // 3] = float("nan")
    logits[5, 0] = float("inf")
    logits[6, vocab - 1] = float("-inf")
    got = greedy_tokens(logits)
    ref = reference.greedy_tokens(logits)
    assert got[1].tolist() == ref[1].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert got[0, :4].tolist() == ref[0, :4].tolist()
    assert got[0, 1] == 3 and got[0, 2] == 0 and got[0, 3] == vocab - 1
    assert torch.equal(greedy_tokens(logits.t().contiguous().t()), got)  # columns strided: read as rows all the same

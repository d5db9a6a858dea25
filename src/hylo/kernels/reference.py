"""Pure-torch kernels: the CPU path, and the oracle every fast kernel is tested against.

Each takes a flat token batch (`Batch`) and the state it reads and updates in place, the same
interface the GPU kernels implement.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hylo.batch import GDN_CHUNK, Batch


def paged_attention(
    q: torch.Tensor,  # [tokens, q_heads, head_dim]
    k: torch.Tensor,  # [tokens, kv_heads, head_dim]
    v: torch.Tensor,  # [tokens, kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, kv_heads, head_dim]
    batch: Batch,
    scale: float,
) -> torch.Tensor:
    """Write this step's keys/values into the paged cache, then causal attention over each sequence's cache."""
    flat = write_kv(k, v, kv_cache, batch)
    block_size, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = q.shape[1] // kv_heads
    out = torch.empty_like(q)
    starts = batch.cu_seqlens.tolist()
    for i, (q_len, ctx_len) in enumerate(zip(batch.query_lens, batch.context_lens)):
        total = ctx_len + q_len
        pos = torch.arange(total, device=q.device)
        slots = batch.block_tables[i, pos // block_size] * block_size + pos % block_size
        keys = flat[0, slots].to(q.dtype).repeat_interleave(group, dim=1)  # [total, q_heads, head_dim]
        values = flat[1, slots].to(q.dtype).repeat_interleave(group, dim=1)
        qi = q[starts[i] : starts[i] + q_len]
        scores = torch.einsum("qhd,khd->hqk", qi.float(), keys.float()) * scale
        causal = pos[None, :] > (ctx_len + torch.arange(q_len, device=q.device))[:, None]
        scores = scores.masked_fill(causal[None], float("-inf"))
        probs = scores.softmax(dim=-1).to(q.dtype)
        out[starts[i] : starts[i] + q_len] = torch.einsum("hqk,khd->qhd", probs, values)
    return out


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Store this step's keys and values at their slots; the cache as [2, slots, kv_heads, head_dim]."""
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
    flat[0].index_copy_(0, batch.slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, batch.slot_mapping, v.to(kv_cache.dtype))
    return flat


def causal_conv1d(
    x: torch.Tensor,  # [tokens, channels]
    weight: torch.Tensor,  # [channels, kernel]
    conv_states: torch.Tensor,  # [slots, channels, kernel - 1], updated in place
    batch: Batch,
) -> torch.Tensor:
    """Depthwise causal conv + SiLU per sequence, continuing from (and updating) each slot's last inputs."""
    kernel = weight.shape[1]
    out = torch.empty_like(x)
    starts = batch.cu_seqlens.tolist()
    for i, (q_len, ctx_len) in enumerate(zip(batch.query_lens, batch.context_lens)):
        slot = int(batch.state_slots[i])
        xi = x[starts[i] : starts[i] + q_len].t()  # [channels, q_len]
        prev = conv_states[slot] if ctx_len > 0 else torch.zeros_like(conv_states[slot])
        window = torch.cat([prev.to(xi.dtype), xi], dim=1)  # [channels, kernel - 1 + q_len]
        conv_states[slot] = window[:, -(kernel - 1) :].to(conv_states.dtype)
        yi = F.conv1d(window[None].to(weight.dtype), weight[:, None, :], groups=weight.shape[0])[0]
        out[starts[i] : starts[i] + q_len] = F.silu(yi).t().to(x.dtype)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Qwen3.5's RMSNorm (zero-centred weight: x·(1+w)) in float32; with a residual, also returns x + residual."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())).to(x.dtype)
    return out if residual is None else (out, x)


def norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Attention's per-head q/k norm, then partial rotary: the first 2·len(inv_freq) channels of each head
    rotate by position (cos/sin in float32, cast like the reference), the rest pass through. x: [tokens, heads, D]."""
    x = rms_norm(x, weight, eps)
    rotary_dim = 2 * inv_freq.numel()
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype)[:, None, :], emb.sin().to(x.dtype)[:, None, :]
    rot, keep = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, keep), dim=-1)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """GDN's output norm per head: weight·norm(x) (weight stored as is), times silu(gate) in float32."""
    xf = x.float()
    out = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (out * F.silu(gate.float())).to(x.dtype)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def gdn_gates(a: torch.Tensor, b: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GDN's per-head gates from the projections a and b: g (log of the state decay, float32) and beta."""
    return -a_log.float().exp() * F.softplus(a.float() + dt_bias), b.sigmoid()


def gated_delta_rule(q, k, v, a, b, a_log, dt_bias, states: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The Ops entry: gates from a, b (each [tokens, v_heads]) and the layer's A_log, dt_bias, then `delta_rule`."""
    return delta_rule(q, k, v, *gdn_gates(a, b, a_log, dt_bias), states, batch)


def delta_rule(
    q: torch.Tensor,  # [tokens, k_heads, k_dim]
    k: torch.Tensor,  # [tokens, k_heads, k_dim]
    v: torch.Tensor,  # [tokens, v_heads, v_dim]
    g: torch.Tensor,  # [tokens, v_heads], log of the state decay (<= 0)
    beta: torch.Tensor,  # [tokens, v_heads]
    states: torch.Tensor,  # [slots, v_heads, k_dim, v_dim] float32, updated in place
    batch: Batch,
) -> torch.Tensor:
    """The gated delta rule per sequence from its slot's state (zero for a new sequence); q, k are L2-normed here."""
    group = v.shape[1] // q.shape[1]
    # Each key head serves `group` consecutive value heads.
    qf = l2norm(q.float()).repeat_interleave(group, dim=1) * q.shape[-1] ** -0.5
    kf = l2norm(k.float()).repeat_interleave(group, dim=1)
    vf, gf, bf = v.float(), g.float(), beta.float()
    out = torch.empty_like(vf)
    if batch.is_decode:
        slots = batch.state_slots
        out, states[slots] = _recurrent_step(qf, kf, vf, gf, bf, states[slots])
        return out.to(v.dtype)
    starts = batch.cu_seqlens.tolist()
    for i, (q_len, ctx_len) in enumerate(zip(batch.query_lens, batch.context_lens)):
        slot = int(batch.state_slots[i])
        s = slice(starts[i], starts[i] + q_len)
        state = states[slot] if ctx_len > 0 else torch.zeros_like(states[slot])
        out[s], states[slot] = _chunked(qf[s], kf[s], vf[s], gf[s], bf[s], state)
    return out.to(v.dtype)


def _recurrent_step(q, k, v, g, beta, state):
    """One token for each of n sequences. q,k: [n, H, dk]; v: [n, H, dv]; g, beta: [n, H]; state [n, H, dk, dv]."""
    state = state * g.exp()[..., None, None]
    predicted = torch.einsum("nhk,nhkv->nhv", k, state)
    delta = (v - predicted) * beta[..., None]
    state = state + k[..., :, None] * delta[..., None, :]
    return torch.einsum("nhk,nhkv->nhv", q, state), state


def _chunked(q, k, v, g, beta, state, chunk: int = GDN_CHUNK):
    """One sequence, in chunks: within a chunk the delta-rule updates are solved as one triangular system.

    q, k: [L, H, dk]; v: [L, H, dv]; g, beta: [L, H]; state: [H, dk, dv]. Returns out [L, H, dv], state.
    """
    length = q.shape[0]
    out = torch.empty_like(v)
    for start in range(0, length, chunk):
        s = slice(start, min(start + chunk, length))
        qc, kc, vc = q[s].transpose(0, 1), k[s].transpose(0, 1), v[s].transpose(0, 1)  # [H, C, d]
        bc = beta[s].t()  # [H, C]
        cum = g[s].t().cumsum(dim=-1)  # [H, C]: log decay from chunk start to each position
        n = qc.shape[1]
        decay = (cum[:, :, None] - cum[:, None, :]).tril().exp().tril()  # [H, C, C]: exp(cum_i - cum_j), j <= i
        strict = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)
        # (I + strictly-lower(diag(beta)·K·Kᵀ ⊙ decay))⁻¹ turns the sequential updates into one solve.
        system = ((bc[..., None] * kc) @ kc.transpose(-1, -2) * decay).masked_fill(~strict, 0)
        eye = torch.eye(n, device=q.device, dtype=q.dtype).expand_as(system)
        values = torch.linalg.solve_triangular(eye + system, bc[..., None] * vc, upper=False, unitriangular=True)
        keys_read = torch.linalg.solve_triangular(
            eye + system, (bc * cum.exp())[..., None] * kc, upper=False, unitriangular=True
        )
        new_values = values - keys_read @ state  # [H, C, dv]: what the old state does not already predict
        attn = (qc @ kc.transpose(-1, -2)) * decay
        out[s] = ((qc * cum.exp()[..., None]) @ state + attn @ new_values).transpose(0, 1)
        last = cum[:, -1:]  # [H, 1]
        state = state * last.exp()[..., None] + (kc * (last - cum).exp()[..., None]).transpose(-1, -2) @ new_values
    return out, state


def lora_delta(
    x: torch.Tensor,  # [tokens, in]
    y: torch.Tensor,  # [tokens, out], updated in place
    a: torch.Tensor,  # [slots, parts, rank, in]
    b: torch.Tensor,  # [slots, out, rank], scaling folded in
    rows: list[tuple[int, int]],  # output rows each part writes
    groups: list[tuple[int, torch.Tensor]],  # (slot, token indices)
) -> None:
    """Shrink x·Aᵀ for all parts at once, then expand each part's rank slice into its own output rows."""
    rank = a.shape[2]
    for slot, tokens in groups:
        xs = x[tokens]
        shrink = xs @ a[slot].reshape(-1, a.shape[-1]).t()  # [n, parts * rank]
        for j, (start, stop) in enumerate(rows):
            y[tokens, start:stop] += shrink[:, j * rank : (j + 1) * rank] @ b[slot, start:stop].t()


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE router after its GEMV: softmax in float32, the top k, their weights renormalised to sum to one.
    logits: [tokens, experts]. Returns weights [tokens, top_k] in the logits' dtype and expert ids [tokens, top_k]
    (int64)."""
    probs = logits.softmax(dim=-1, dtype=torch.float)
    weights, experts = probs.topk(top_k, dim=-1)
    return (weights / weights.sum(dim=-1, keepdim=True)).to(logits.dtype), experts


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated MLP's activation: SiLU(gate) · up."""
    return F.silu(gate) * up


def routed_experts(layer, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, shared_gate: torch.Tensor,
                   shared: torch.Tensor) -> torch.Tensor:
    """An MoE layer's routed experts (`layers.moe.Experts`: w13, w2 and their LoRA slots): the (token, expert) pairs
    sorted by expert, then each expert's run of pairs as two matmuls. One host sync per layer (the run lengths).
    x: [tokens, hidden]; weights, experts: [tokens, top_k]. Returns this rank's partial sum of the block: the routed
    sum plus the shared expert's output `shared` [tokens, hidden] gated by σ(shared_gate) [tokens, 1]."""
    top_k = experts.shape[1]
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    token = order // top_k  # the token of each sorted pair
    pair_weights = weights.reshape(-1)[order]
    lora = getattr(layer, "lora_batch", None)
    pair_slots = lora.token_slots[token] if lora is not None and lora.active else None
    rows = [(0, layer.local), (layer.local, 2 * layer.local)]
    xs_all = x[token]
    ys = torch.empty_like(xs_all)
    start = 0
    for e, n in enumerate(torch.bincount(flat, minlength=layer.num_experts).tolist()):
        if n == 0:
            continue
        run = slice(start, start + n)
        start += n
        xs = xs_all[run]
        gate_up = F.linear(xs, layer.w13[e])
        groups = _slot_groups(pair_slots[run]) if pair_slots is not None else []
        if groups:
            lora_delta(xs, gate_up, layer.lora_a13[:, e], layer.lora_b13[:, e], rows, groups)
        gate, up = gate_up.chunk(2, dim=-1)
        h = F.silu(gate) * up
        y = F.linear(h, layer.w2[e])
        if groups:
            lora_delta(h, y, layer.lora_a2[:, e], layer.lora_b2[:, e], [(0, y.shape[1])], groups)
        ys[run] = (y * pair_weights[run, None]).to(ys.dtype)
    routed = torch.zeros_like(x).index_add_(0, token, ys)
    return routed + torch.sigmoid(shared_gate) * shared


def _slot_groups(slots: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(slot, positions) for each adapter slot among these tokens."""
    return [(s, torch.where(slots == s)[0]) for s in slots.unique().tolist() if s >= 0]


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """[2, rows] int64: each row's argmax (torch's: the lowest index among equal maxima) and 1 where every logit of the
    row is finite, else 0."""
    return torch.stack([logits.argmax(dim=-1), torch.isfinite(logits).all(dim=-1).long()])

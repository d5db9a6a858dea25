"""Paged decode attention, hylo's Triton kernel (its context in one split, and in as many as it chooses) against
PyTorch's FlexAttention, on the Qwen3.5-9B attention shape (16 query heads, 4 KV heads, head_dim 256, 16-token
pages in shuffled order, bf16): the time per call, and the largest difference between their outputs.

python scripts/compare_decode_attention.py [device]

FlexAttention reads the same paged cache in place: the cache is one long key sequence, each decode query
gets a 16-row query block of its own, and that block's key blocks are its sequence's pages (the block
table), so it visits no other sequence's pages; a mask cuts the last page at the sequence's length.
"""

import sys

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from hylo.batch import Batch
from hylo.bench import graph_us
from hylo.kernels.triton_decode import attention_splits, paged_attention_decode

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 16, 4, 256, 16
# Its default tiles exceed the 16-token pages (a key tile must not span two pages): with them it compiles nothing.
FLEX_OPTIONS = {"BLOCK_M": 16, "BLOCK_N": 16}
CASES = [(1, 512), (1, 4096), (1, 32768), (32, 512), (32, 4096), (128, 1024)]  # (sequences, tokens in each)


def make_case(seqs: int, length: int, device: torch.device):
    pages = -(-length // PAGE)
    total = seqs * pages + 1
    cache = torch.randn(2, total, PAGE, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    tables = torch.randperm(total - 1, device=device).view(seqs, pages)
    q = torch.randn(seqs, Q_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    last = (length - 1) // PAGE, (length - 1) % PAGE
    k, v = cache[0, tables[:, last[0]], last[1]].clone(), cache[1, tables[:, last[0]], last[1]].clone()  # the newest token
    batch = Batch(input_ids=None, positions=None, query_lens=[1] * seqs, context_lens=[length - 1] * seqs, cu_seqlens=torch.arange(seqs + 1, device=device),
                  seq_lens=torch.full((seqs,), length, device=device), state_slots=None, block_tables=tables,
                  slot_mapping=tables[:, last[0]] * PAGE + last[1], logits_indices=None)
    return q, k, v, cache, batch


def flex_inputs(q, cache, batch: Batch):
    seqs, pages = batch.block_tables.shape
    total = cache.shape[1]
    device = q.device
    query = torch.zeros(1, Q_HEADS, seqs * PAGE, HEAD_DIM, device=device, dtype=q.dtype)
    query[0, :, ::PAGE] = q.transpose(0, 1)  # row 0 of each sequence's query block
    keys = cache[0].view(1, total * PAGE, KV_HEADS, HEAD_DIM).transpose(1, 2)  # [1, kv_heads, all slots, D], no copy
    values = cache[1].view(1, total * PAGE, KV_HEADS, HEAD_DIM).transpose(1, 2)
    logical = torch.zeros(total, dtype=torch.long, device=device)  # each page's index in its sequence
    logical[batch.block_tables.flatten()] = torch.arange(pages, device=device).repeat(seqs)
    owner = torch.full((total,), -1, dtype=torch.long, device=device)
    owner[batch.block_tables.flatten()] = torch.arange(seqs, device=device).repeat_interleave(pages)
    seq_lens = batch.seq_lens

    def mask_mod(b, h, q_idx, kv_idx):
        seq, page = q_idx // PAGE, kv_idx // PAGE
        return (q_idx % PAGE == 0) & (owner[page] == seq) & (logical[page] * PAGE + kv_idx % PAGE < seq_lens[seq])

    indices = torch.zeros(1, 1, seqs, total, dtype=torch.int32, device=device)  # one column per key block of the cache
    indices[0, 0, :, :pages] = batch.block_tables
    mask = BlockMask.from_kv_blocks(
        torch.full((1, 1, seqs), pages, dtype=torch.int32, device=device), indices,
        BLOCK_SIZE=PAGE, mask_mod=mask_mod, seq_lengths=(seqs * PAGE, total * PAGE),
    )
    return query, keys, values, mask


def main(device: str = "cuda") -> None:
    device = torch.device(device)
    flex = torch.compile(flex_attention, dynamic=False)
    scale = HEAD_DIM**-0.5
    print(f"{torch.cuda.get_device_name(device)}: 16 q heads, 4 kv heads, head_dim 256, bf16, pages of 16")
    print(f"{'seqs':>5} {'tokens':>7} {'1 split us':>10} {'triton us':>10} {'splits':>6} {'flex us':>9} {'flex/triton':>12} {'max diff':>9}")
    for seqs, length in CASES:
        q, k, v, cache, batch = make_case(seqs, length, device)
        ours = paged_attention_decode(q, k, v, cache, batch, scale)
        t_ours = graph_us(lambda: paged_attention_decode(q, k, v, cache, batch, scale))
        t_one = graph_us(lambda: paged_attention_decode(q, k, v, cache, batch, scale, splits=1))
        ours_row = f"{seqs:5d} {length:7d} {t_one:10.1f} {t_ours:10.1f} {attention_splits(seqs, KV_HEADS, device):6d}"
        query, keys, values, mask = flex_inputs(q, cache, batch)
        call = lambda: flex(query, keys, values, block_mask=mask, scale=scale, enable_gqa=True, kernel_options=FLEX_OPTIONS)  # noqa: E731
        try:
            diff = (ours.float() - call()[0, :, ::PAGE].transpose(0, 1).float()).abs().max().item()
            t_flex = graph_us(call)
        except Exception as error:  # a shape FlexAttention cannot compile is a result too
            print(f"{ours_row}   flex failed: {str(error).splitlines()[0][:120]}", flush=True)
            continue
        print(f"{ours_row} {t_flex:9.1f} {t_flex / t_ours:12.2f} {diff:9.4f}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])

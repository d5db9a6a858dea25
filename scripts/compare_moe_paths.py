"""Routed experts of the Qwen3.5-35B-A3B shape (256 experts, top 8, hidden 2048, expert size 512, bf16): per-pair
GEMVs against grouped matmuls over sorted pairs, by batch size, without and with 8 adapters of rank 16 on the
experts. Sets `triton_moe.GEMV_PAIRS`.

python scripts/compare_moe_paths.py
"""

import torch

from hylo.bench import graph_us
from hylo.distributed import TPGroup
from hylo.kernels import select_ops
from hylo.kernels.triton_moe import routed_experts
from hylo.layers.lora import LoRABatch
from hylo.layers.moe import Experts

EXPERTS, TOP_K, HIDDEN, SIZE, ADAPTERS, RANK = 256, 8, 2048, 512, 8, 16


def main() -> None:
    device = torch.device("cuda")
    with torch.device(device):
        layer = Experts(EXPERTS, HIDDEN, SIZE, TPGroup(), select_ops(device), "")
        layer.w13.data = torch.randn(EXPERTS, 2 * SIZE, HIDDEN, dtype=torch.bfloat16) * 0.02
        layer.w2.data = torch.randn(EXPERTS, HIDDEN, SIZE, dtype=torch.bfloat16) * 0.02
        layer.to(torch.bfloat16)
        layer.enable_lora(ADAPTERS, RANK, LoRABatch(), 1)
    for t in (layer.lora_a13, layer.lora_b13, layer.lora_a2, layer.lora_b2):
        t.normal_(std=0.02)
    print(f"{torch.cuda.get_device_name(device)}: one MoE layer's routed experts, µs per call")
    print(f"{'tokens':>6} {'adapters':>8} {'per pair':>9} {'grouped':>8}")
    for tokens in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        x = torch.randn(tokens, HIDDEN, device=device, dtype=torch.bfloat16)
        experts = torch.rand(tokens, EXPERTS, device=device).topk(TOP_K, dim=-1).indices
        weights = torch.full((tokens, TOP_K), 1 / TOP_K, device=device, dtype=torch.bfloat16)
        shared_gate, shared = torch.zeros(tokens, 1, device=device, dtype=torch.bfloat16), torch.zeros_like(x)
        for adapters in (0, ADAPTERS):
            layer.lora_batch = LoRABatch(torch.arange(tokens, device=device) % ADAPTERS, per_token=True) if adapters else None
            times = [graph_us(lambda: routed_experts(layer, x, weights, experts, shared_gate, shared, gemv_pairs=limit)) for limit in (10**9, 0)]
            print(f"{tokens:6d} {adapters:8d} {times[0]:9.1f} {times[1]:8.1f}", flush=True)


if __name__ == "__main__":
    main()

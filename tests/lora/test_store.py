"""Each tensor-parallel rank reads only its own slices of an adapter file, and together they read all of it."""

import pytest
import torch
from safetensors import safe_open

from hylo.config import read_model_config
from hylo.distributed import TPGroup
from hylo.kernels import select_ops
from hylo.lora.lazy import LazyTensor
from hylo.lora.request import LoRARequest
from hylo.lora.store import AdapterStore
from hylo.models.qwen3_5 import Qwen3_5ForCausalLM
from tests.conftest import EXPERT_PARAMETERS, MAX_RANK


@pytest.mark.parametrize("kind, lora", [("dense", {}), ("moe", dict(target_modules=None, target_parameters=EXPERT_PARAMETERS))])
def test_ranks_read_their_own_slices_and_all_of_them_together(kind, lora, checkpoints, adapters, monkeypatch):
    folder = adapters(kind, seed=70, **lora)
    config = read_model_config(checkpoints(kind))
    with safe_open(f"{folder}/adapter_model.safetensors", "pt") as f:
        stored = {key: f.get_tensor(key) for key in f.keys()}
    size = 2
    read_by_rank = []
    real_read = LazyTensor.read
    for rank in range(size):
        seen: dict[tuple[str, str], torch.Tensor] = {}  # (module, matrix) → which stored elements this rank read

        def read(t: LazyTensor, seen=seen) -> torch.Tensor:
            key = f"{t.module}.{t.matrix}.weight"
            mask = seen.setdefault(key, torch.zeros(stored[key].shape, dtype=torch.bool))
            mask[t.rows.start : t.rows.stop : t.rows.step, t.cols.start : t.cols.stop : t.cols.step] = True
            return real_read(t)

        monkeypatch.setattr(LazyTensor, "read", read)
        model = Qwen3_5ForCausalLM(config, TPGroup(rank, size), select_ops(torch.device("cpu")))
        AdapterStore(model, config, 1, MAX_RANK, TPGroup(rank, size)).register(LoRARequest("a", 1, folder))
        read_by_rank.append(seen)
    monkeypatch.setattr(LazyTensor, "read", real_read)
    total = sum(t.numel() for t in stored.values())
    per_rank = [sum(int(m.sum()) for m in seen.values()) for seen in read_by_rank]
    assert all(n < total for n in per_rank), f"each rank reads less than the whole file ({per_rank} of {total})"
    for key, tensor in stored.items():
        union = read_by_rank[0].get(key, torch.zeros(tensor.shape, dtype=torch.bool)) | read_by_rank[1].get(key, torch.zeros(tensor.shape, dtype=torch.bool))
        assert union.all(), f"no rank read part of {key}: its values would go unchecked"

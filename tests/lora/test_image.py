"""The store lays out a rank's share with a few batched copies: the image must equal each slice placed as read,
scaled as LazyTensor.values scales it (float32, rounded back to the stored dtype), bit for bit."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hylo.config import read_model_config
from hylo.distributed import TPGroup
from hylo.kernels import select_ops
from hylo.layers.lora import write_lora_part
from hylo.lora.adapter import read_adapter
from hylo.lora.lazy import LazyTensor
from hylo.lora.request import LoRARequest
from hylo.lora.store import AdapterStore
from hylo.models.qwen3_5 import Qwen3_5ForCausalLM
from tests.conftest import EXPERT_PARAMETERS, MAX_RANK


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind, lora", [("dense", {}), ("moe", dict(target_modules=None, target_parameters=EXPERT_PARAMETERS))])
def test_image_is_each_slice_placed_as_read(kind, lora, stored, checkpoints, adapters, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(adapters(kind, seed=71, **lora), folder)  # lora_alpha 8 over rank 5: a scale of 1.6, not a power of 2
    weights = load_file(folder / "adapter_model.safetensors")
    save_file({key: t.to(stored) for key, t in weights.items()}, folder / "adapter_model.safetensors")
    config = read_model_config(checkpoints(kind))
    request = LoRARequest("a", 1, str(folder))
    for rank, size in [(0, 1), (0, 2), (1, 2)]:
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # slots in bf16: a float32 file is scaled, then rounded to the slot
        try:
            model = Qwen3_5ForCausalLM(config, TPGroup(rank, size), select_ops(torch.device("cpu")))
        finally:
            torch.set_default_dtype(default)
        store = AdapterStore(model, config, 1, MAX_RANK, TPGroup(rank, size))
        store.register(request)
        expected = {}
        for name, (a, b) in read_adapter(request, model, config, MAX_RANK).weights.items():
            target = store.targets[name]
            tensors = expected.setdefault(target.layer, [torch.zeros_like(t) for t in target.layer.lora_slot(0)])
            a_view, b_view = target.layer.lora_views(tensors, target.part)
            write_lora_part(target.part, a_view, b_view, a, b, rank, size, LazyTensor.values)
        assert list(store.images[1]) == list(expected)
        for layer, tensors in expected.items():
            for got, want in zip(store.images[1][layer], tensors, strict=True):
                assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want), (kind, stored, rank, size)

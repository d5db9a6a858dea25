"""One rank's adapter data: read adapters in host memory, and writing this rank's share into device slots."""

from __future__ import annotations

import torch
from torch import nn

from hylo.config import ModelConfig
from hylo.distributed import TPGroup
from hylo.layers.lora import LoRABatch, write_lora_part
from hylo.lora.adapter import Adapter, lora_targets, read_adapter
from hylo.lora.lazy import LazyTensor
from hylo.lora.peft_config import AdapterError
from hylo.lora.request import LoRARequest


class AdapterStore:
    def __init__(self, model: nn.Module, model_config: ModelConfig, max_loras: int, max_rank: int, tp: TPGroup):
        self.model = model
        self.model_config = model_config
        self.max_rank = max_rank
        self.max_loras = max_loras
        self.tp = tp
        self.batch = LoRABatch()
        self.targets = lora_targets(model)
        self.layers = [m for m in model.modules() if hasattr(m, "lora_parts") and m.lora_parts()]
        for layer in self.layers:
            layer.enable_lora(max_loras, max_rank, self.batch, tp.size)
        self.images: dict[int, dict[nn.Module, list[torch.Tensor]]] = {}

    @torch.no_grad()
    def register(self, request: LoRARequest) -> None:
        """Read and validate the adapter's folder (AdapterError if refused), then lay this rank's share out in host
        memory exactly as a slot holds it (pinned on CUDA), so that loading it is one async copy per tensor."""
        adapter: Adapter = read_adapter(request, self.model, self.model_config, self.max_rank)
        pinned = next(self.model.parameters()).is_cuda
        image: dict[nn.Module, list[torch.Tensor]] = {}

        def read(t: LazyTensor) -> torch.Tensor:  # this rank's share only; the ranks' shares cover every value
            values = t.read()
            if why := t.non_finite(values):
                raise AdapterError(f"adapter '{request.lora_name}' ({request.lora_path}) is refused:\n  {t.module}: {why}")
            return values

        for name, (a, b) in adapter.weights.items():
            target = self.targets[name]
            if target.layer not in image:
                image[target.layer] = [torch.zeros(t.shape, dtype=t.dtype, pin_memory=pinned) for t in target.layer.lora_slot(0)]
            a_view, b_view = target.layer.lora_views(image[target.layer], target.part)
            write_lora_part(target.part, a_view, b_view, a, b, self.tp.rank, self.tp.size, read)
        self.images[request.lora_int_id] = image

    def forget(self, lora_id: int) -> None:
        self.images.pop(lora_id, None)

    @torch.no_grad()
    def load(self, slot: int, lora_id: int) -> None:
        """Queued on the compute stream, so the next step sees the adapter without the host waiting for the copy."""
        image = self.images[lora_id]
        for layer in self.layers:
            if layer in image:
                for device, host in zip(layer.lora_slot(slot), image[layer]):
                    device.copy_(host, non_blocking=True)
            else:
                for device in layer.lora_slot(slot):
                    device.zero_()

    def clear(self, slot: int) -> None:
        for layer in self.layers:
            for tensor in layer.lora_slot(slot):
                tensor.zero_()

    def set_step(self, lora_slots: list[int], query_lens: list[int], device: torch.device) -> None:
        """Which slot each token uses this step; tokens of base-model sequences join no group (no LoRA work).

        A CUDA decode step reads the slots per token in one kernel (BGMV); other CUDA steps sort the tokens
        by slot once for all layers (SGMV); on the CPU each slot's tokens are two matmuls."""
        token_slots = torch.tensor(lora_slots, device=device).repeat_interleave(
            torch.tensor(query_lens, device=device), output_size=sum(query_lens))  # a known size: no wait for the GPU
        used = sorted(set(lora_slots) - {-1})
        cuda = device.type == "cuda"
        self.batch.token_slots = token_slots
        self.batch.per_token = cuda and all(n == 1 for n in query_lens)
        self.batch.sorted_rows = None
        self.batch.groups = []
        if cuda and not self.batch.per_token and used:
            from hylo.kernels.triton_grouped import sort_rows

            # Small row blocks: the shrink's output is a few columns wide, so its row blocks are all its parallelism.
            self.batch.sorted_rows = sort_rows(token_slots, self.max_loras, block=16)
        elif not cuda:
            self.batch.groups = [(s, torch.where(token_slots == s)[0]) for s in used]

    def use_static_slots(self, token_slots: torch.Tensor) -> None:
        """A captured decode step: the slots live in the graph's input buffer, refilled before each replay."""
        self.batch.token_slots = token_slots
        self.batch.per_token = True
        self.batch.sorted_rows = None
        self.batch.groups = []

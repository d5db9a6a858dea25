"""One rank's adapter data: read adapters in host memory, and writing this rank's share into device slots."""

from __future__ import annotations

import itertools
import logging
import time

import torch
from torch import nn

from hylo.batch import device_tensor
from hylo.config import ModelConfig
from hylo.distributed import TPGroup
from hylo.layers.lora import LoRABatch, write_lora_part
from hylo.lora.adapter import Adapter, lora_targets, read_adapter
from hylo.lora.lazy import LazyTensor, all_finite
from hylo.lora.peft_config import AdapterError
from hylo.lora.request import LoRARequest

log = logging.getLogger("hylo")


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
        memory exactly as a slot holds it (pinned on CUDA), so that loading it is one async copy per tensor.

        Reads run beside the decode steps, and each torch call gives up the GIL, which can take a switch interval to
        come back: several calls per slice made a read take a second, so the share is placed with a handful (one
        allocation, one copy, one check) whatever the number of slices."""
        start = time.perf_counter()
        adapter: Adapter = read_adapter(request, self.model, self.model_config, self.max_rank)
        layers = dict.fromkeys(self.targets[name].layer for name in adapter.weights)
        image, buffers = _zeroed_image(layers, pinned=next(self.model.parameters()).is_cuda)
        writes: list[tuple[torch.Tensor, LazyTensor]] = []  # (its place in the image, slice) for each slice this rank reads
        for name, (a, b) in adapter.weights.items():
            target = self.targets[name]
            a_view, b_view = target.layer.lora_views(image[target.layer], target.part)
            # It places the slices themselves (LazyTensors, not read yet): _copy reads and copies them all at once.
            write_lora_part(target.part, _Deferred(a_view, writes), _Deferred(b_view, writes), a, b, self.tp.rank, self.tp.size,
                            lambda t: t)
        _copy(writes)
        # Every value this rank reads lands in the image (the ranks' shares cover every value), and NaN and infinity
        # survive the slot's dtype: one check of all of it; only if that fails is each slice checked as read, which
        # decides the refusal and names the module.
        if not all(all_finite(buffer) for buffer in buffers):
            for _, t in writes:
                if why := t.non_finite(t.values()):
                    raise AdapterError(f"adapter '{request.lora_name}' ({request.lora_path}) is refused:\n  {t.module}: {why}")
        self.images[request.lora_int_id] = image
        if self.tp.rank == 0:  # a cold adapter's first request waits this long, beside the running ones
            log.info("adapter %s read in %.0f ms", request.lora_name, 1e3 * (time.perf_counter() - start))

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
        token_slots = device_tensor(lora_slots, device).repeat_interleave(
            device_tensor(query_lens, device), output_size=sum(query_lens))  # a known size: no wait for the GPU
        used = sorted(set(lora_slots) - {-1})
        cuda = device.type == "cuda"
        per_token = cuda and all(n == 1 for n in query_lens)
        sorted_rows, groups = None, []
        if cuda and not per_token and used:
            from hylo.kernels.triton_grouped import sort_rows

            # Small row blocks: the shrink's output is a few columns wide, so its row blocks are all its parallelism.
            sorted_rows = sort_rows(token_slots, self.max_loras, block=16)
        elif not cuda:
            groups = [(s, torch.where(token_slots == s)[0]) for s in used]
        self.batch.start_step(token_slots, per_token, sorted_rows, groups)

    def use_static_slots(self, token_slots: torch.Tensor | None) -> None:
        """A captured decode step: the slots live in the graph's input buffer, refilled before each replay (None: a
        graph for steps that use no adapter, which launches no LoRA kernel)."""
        self.batch.start_step(token_slots, per_token=token_slots is not None)


class _Deferred:
    """A slot view as `write_lora_part` sees it: records which slice goes where, for `_copy` to copy them all at once."""

    def __init__(self, view: torch.Tensor, writes: list[tuple[torch.Tensor, LazyTensor]]):
        self.view, self.writes = view, writes

    def __setitem__(self, index, t: LazyTensor) -> None:
        self.writes.append((self.view[index], t))


def _zeroed_image(layers, pinned: bool) -> tuple[dict[nn.Module, list[torch.Tensor]], list[torch.Tensor]]:
    """Host tensors shaped like each layer's slot, carved out of one zeroed buffer per dtype (returned too): one
    allocation, not one per tensor."""
    slots = {layer: layer.lora_slot(0) for layer in layers}
    sizes: dict[torch.dtype, int] = {}
    for t in itertools.chain.from_iterable(slots.values()):
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    buffers = {dtype: torch.zeros(n, dtype=dtype, pin_memory=pinned) for dtype, n in sizes.items()}
    used = dict.fromkeys(sizes, 0)
    image = {}
    for layer, tensors in slots.items():
        image[layer] = []
        for t in tensors:
            image[layer].append(buffers[t.dtype][used[t.dtype] : used[t.dtype] + t.numel()].view(t.shape))
            used[t.dtype] += t.numel()
    return image, list(buffers.values())


def _copy(writes: list[tuple[torch.Tensor, LazyTensor]]) -> None:
    """Every slice into its place in one torch call, those with a scale (B) multiplied first, one call per scale
    (torch's _foreach ops, as torch.optim uses: one call for a list of tensors)."""
    sources = [t.read() for _, t in writes]
    scales: dict[float, list[int]] = {}
    for i, (_, t) in enumerate(writes):
        if t.scale != 1.0:
            scales.setdefault(t.scale, []).append(i)
    for scale, indices in scales.items():
        # Out of place, bf16 and fp16 are multiplied in float32 and rounded back, exactly as LazyTensor.values does
        # (multiplying the image in place rounds differently); other dtypes go through LazyTensor.values.
        fast = [i for i in indices if sources[i].dtype in (torch.bfloat16, torch.float16, torch.float32)]
        for i, product in zip(fast, torch._foreach_mul([sources[i] for i in fast], scale)):
            sources[i] = product
        for i in set(indices) - set(fast):
            sources[i] = writes[i][1].values()
    if writes:
        torch._foreach_copy_([place for place, _ in writes], sources)


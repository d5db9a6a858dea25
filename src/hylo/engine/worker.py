"""One tensor-parallel rank: its shard of the model, its caches and adapter slots, one forward per step."""

from __future__ import annotations

import logging
import sys
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from hylo.batch import StepInput
from hylo.config import ModelConfig
from hylo.distributed import TPGroup, enable_one_shot_all_reduce
from hylo.engine.cache import CachePlan
from hylo.engine.config import EngineConfig
from hylo.engine.cuda_graphs import DecodeGraphs
from hylo.kernels import select_ops
from hylo.loader import init_dummy_weights, load_weights
from hylo.lora.peft_config import AdapterError
from hylo.lora.request import LoRARequest
from hylo.lora.store import AdapterStore
from hylo.models.qwen3_5 import Qwen3_5ForCausalLM

log = logging.getLogger("hylo")
CPU_CACHE_BYTES = 1 << 30  # default state budget per rank on CPU, where no device memory tells us a size
GIL_SWITCH_SECONDS = 5e-4
READ_THREADS = 4  # adapters read at once on each rank


class ModelWorker:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, tp: TPGroup, device: torch.device, dtype: torch.dtype, progress: bool):
        self.config = config
        self.model_config = model_config
        self.tp = tp
        self.device = device
        self.dtype = dtype
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                self.model = Qwen3_5ForCausalLM(model_config, tp, select_ops(device))
        finally:
            torch.set_default_dtype(default_dtype)
        if config.load_format == "dummy":
            init_dummy_weights(self.model, config.seed)
        else:
            load_weights(self.model, model_config, tp, progress)
        self.lora = None
        if config.enable_lora:
            self.lora = AdapterStore(self.model, model_config, config.max_loras, config.max_lora_rank, tp)
            # Several adapters wanted at once are read side by side: a read is mostly torch work, which runs
            # without the GIL, and the requests waiting for them wait for the slowest read, not for their sum.
            self.read_threads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="hylo-adapter-read")
            self.reads: dict[int, Future] = {}
            # A read shares the GIL with the steps: it must not wait CPython's default 5 ms for it each time it
            # comes back from I/O or a torch op, nor hold it that long while a step is due.
            sys.setswitchinterval(GIL_SWITCH_SECONDS)
        self.shapes = self.model.cache_shapes()
        self.caches = None
        self.graphs = None

    def cache_budget(self) -> int:
        """Bytes this rank can give to KV blocks and GDN state."""
        if self.config.kv_cache_memory_bytes is not None:
            return self.config.kv_cache_memory_bytes
        if self.device.type != "cuda":
            return CPU_CACHE_BYTES
        free, total = torch.cuda.mem_get_info(self.device)
        # Blocks this process's allocator keeps cached but unused (e.g. an earlier engine's) are free to us.
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        text = self.model_config.text
        # Room for one step's activations and logits (an estimate; no profiling run is made).
        widest = max(text.hidden_size * 4, getattr(text, "intermediate_size", 0) * 2, text.num_attention_heads * text.head_dim * 2)
        activations = 6 * self.config.max_num_batched_tokens * widest * 4 + 3 * self.config.max_num_seqs * text.vocab_size * 4
        return int(self.config.gpu_memory_utilization * total - (total - free) - activations)

    def allocate(self, plan: CachePlan, max_model_len: int) -> None:
        self.caches = plan.allocate(self.shapes, self.config.block_size, self.dtype, self.device)
        if self.device.type != "cuda":
            return
        if self.tp.size > 1:
            enable_one_shot_all_reduce(self.device)
        if self.config.enforce_eager:
            if self.tp.rank == 0:
                log.info("decode steps run eagerly (no CUDA graphs): enforce_eager")
        else:  # at TP>1 every rank captures the same graphs in the same order, all-reduces inside them
            self.graphs = DecodeGraphs(self.model, self.caches, self.lora, plan, self.config.block_size, self.config.max_num_seqs,
                                       -(-max_model_len // self.config.block_size), self.device)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor:
        """Logits [sampled sequences, vocab] in float32 (every rank computes them; the driver samples). Prefix caching's
        snapshot copies happen around the forward, outside any graph."""
        if step.snapshot_restores:
            self.caches.restore_snapshots(step.snapshot_restores)
        logits = self._forward(step)
        if step.snapshot_saves:
            self.caches.save_snapshots(step.snapshot_saves)
        return logits

    def _forward(self, step: StepInput) -> torch.Tensor:
        if self.graphs is not None and self.graphs.fits(step):
            return self.graphs.run(step)
        batch = step.to_batch(self.device)
        if self.lora is not None:
            self.lora.set_step(step.lora_slots, step.query_lens, self.device)
        return self.model.compute_logits(self.model(batch, self.caches))

    def graph_replay_ms(self, batch: int, replays: int) -> float | None:
        """For the benchmark: a captured decode step's GPU time (None without graphs)."""
        return self.graphs.replay_ms(batch, replays) if self.graphs is not None else None

    def lora_read_start(self, request: LoRARequest) -> None:
        """Read the adapter's folder on one of this rank's reading threads; the steps go on meanwhile."""
        self.reads[request.lora_int_id] = self.read_threads.submit(self.lora.register, request)

    @property
    def reading(self) -> bool:
        """Whether an adapter read is under way on this rank (its thread then needs the GIL now and then)."""
        return self.lora is not None and bool(self.reads)

    def lora_read_done(self) -> dict[int, str | None]:
        """Reads finished since the last call: adapter id → None, or why it was refused."""
        done = {}
        for lora_id, future in list(self.reads.items()):
            if future.done():
                del self.reads[lora_id]
                error = future.exception()
                done[lora_id] = None if error is None else str(error) if isinstance(error, AdapterError) else f"reading it failed: {error!r}"
        return done

    def lora_forget(self, lora_id: int) -> None:
        self.lora.forget(lora_id)

    def lora_load(self, slot: int, lora_id: int) -> None:
        self.lora.load(slot, lora_id)

    def lora_clear(self, slot: int) -> None:
        self.lora.clear(slot)

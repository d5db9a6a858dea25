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
from hylo.engine.pending import fill_pending
from hylo.engine.profiling import longest_step, profile_plan, sampler_inputs, widest_step
from hylo.kernels import select_ops
from hylo.loader import init_dummy_weights, load_weights
from hylo.lora.peft_config import AdapterError
from hylo.lora.request import LoRARequest
from hylo.lora.store import AdapterStore
from hylo.models.qwen3_5 import Qwen3_5ForCausalLM
from hylo.sampling import sample
from hylo.state import CacheTensors

log = logging.getLogger("hylo")
CPU_CACHE_BYTES = 1 << 30  # default state budget per rank on CPU, where no device memory tells us a size
GIL_SWITCH_SECONDS = 5e-4
READ_THREADS = 4  # adapters read at once on each rank
# What torch's CUDA allocator adds to the cache tensors' own bytes: a tensor of 10 MB or more is rounded up to a
# multiple of 2 MiB, smaller ones are served from shared 20 MiB segments (the last one may stay mostly empty).
ALLOCATOR_ROUNDING = 2 << 20
ALLOCATOR_SEGMENT = 20 << 20


class ModelWorker:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, tp: TPGroup, device: torch.device, dtype: torch.dtype, progress: bool):
        self.config = config
        self.model_config = model_config
        self.tp = tp
        self.device = device
        self.dtype = dtype
        allocated = self._allocated()
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
        self.weight_bytes = self._allocated() - allocated
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
        self.lora_slot_bytes = self._allocated() - allocated - self.weight_bytes
        self.shapes = self.model.cache_shapes()
        self.caches = None
        self.graphs = None

    def enable_one_shot_all_reduce(self) -> None:
        enable_one_shot_all_reduce(self.device, self.model_config.text.hidden_size, self.dtype, self.model.lm_head.block.local_size(self.tp.size))

    def cache_budget(self, max_model_len: int) -> int:
        """Bytes this rank can give to KV blocks and GDN state: kv_cache_memory_bytes if set, CPU_CACHE_BYTES on the
        CPU, else measured (`_measured_budget`). Called once, before `allocate`."""
        if self.config.kv_cache_memory_bytes is not None:
            return self.config.kv_cache_memory_bytes
        if self.device.type != "cuda":
            return CPU_CACHE_BYTES
        return self._measured_budget(max_model_len)

    def _measured_budget(self, max_model_len: int) -> int:
        """gpu_memory_utilization × the device's memory, less what is in use (weights, adapter slots, the CUDA context,
        other processes), less the peak of the largest steps and what the decode graphs take, both measured on a
        throwaway cache:
        - the steps' peak is how much torch's allocator reserved over them, nothing being handed back to the device in
          between: rounding included, and the process's peak statistics (max_memory_allocated ...), which are the
          caller's, left alone;
        - the graphs' share is the device's free memory before capturing less after: NCCL's buffers and the graph
          executables live outside torch's allocator;
        - what is in use is measured once the trial is dropped, so that whatever it leaves behind (cuBLAS
          workspaces, NCCL communicators made at the first collective, loaded kernels) counts too.

        The decode graphs are measured by capturing them all against the throwaway cache and dropping them; they
        are captured again against the real cache in `allocate`. Their memory is mostly NCCL's and the graph
        pool's, neither of which an eager step shows, and a capture bakes in the cache's addresses, so the real
        cache must exist before the graphs that serve; capturing twice costs start-up time (the second capture
        compiles nothing), not memory."""
        torch.cuda.empty_cache()  # blocks cached from before (an earlier engine's, the loader's) must not serve the steps
        plan = profile_plan(self.config, max_model_len)
        caches = plan.allocate(self.shapes, self.config.block_size, self.dtype, self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        self._run_largest_steps(caches, max_model_len)
        activations = torch.cuda.memory_reserved(self.device) - reserved
        before_graphs = self._free()
        graphs = None if self.config.enforce_eager else self._capture_graphs(plan, caches, max_model_len)
        graph_bytes = max(0, before_graphs - self._free())
        del graphs, caches
        torch.cuda.empty_cache()  # the steps' blocks and the graph pool go back: the real cache is allocated next
        free, total = torch.cuda.mem_get_info(self.device)
        in_use = total - free
        rounding = CachePlan.num_tensors(self.shapes, self.config.enable_prefix_caching) * ALLOCATOR_ROUNDING + ALLOCATOR_SEGMENT
        limit = int(self.config.gpu_memory_utilization * total)
        budget = limit - in_use - activations - graph_bytes - rounding
        other = in_use - self.weight_bytes - self.lora_slot_bytes
        figures = (f"gpu_memory_utilization={self.config.gpu_memory_utilization:g} of {_gib(total)} allows {_gib(limit)}; in use "
                   f"{_gib(in_use)} (weights {_gib(self.weight_bytes)}, adapter slots {_gib(self.lora_slot_bytes)}, the rest "
                   f"{_gib(other)}: CUDA context, cuBLAS and NCCL buffers, other processes); peak activations {_gib(activations)}; decode graphs {_gib(graph_bytes)}")
        if self.tp.rank == 0:
            log.info("memory per rank: %s; cache budget %s (and %s for the allocator's rounding of its tensors)", figures, _gib(budget),
                     _gib(rounding))
        if budget <= 0:
            raise ValueError(f"{self.device}: {figures}: nothing is left for the KV/state cache; raise gpu_memory_utilization, "
                             f"or lower max_num_batched_tokens / max_num_seqs")
        return budget

    @torch.inference_mode()
    def _run_largest_steps(self, caches: CacheTensors, max_model_len: int) -> None:
        """The profiling steps (hylo.engine.profiling), as `execute` runs them, the widest one's rows sampled too
        (the driver samples on this device; every rank does it here, which changes none of the ranks' minimum)."""
        self.caches = caches
        try:
            widest = widest_step(self.config, max_model_len)
            logits = self._forward(widest)
            sample(logits[: len(widest.query_lens)], sampler_inputs(len(widest.query_lens), self.config.max_logprobs))
            del logits
            self._forward(longest_step(self.config, max_model_len))
        finally:
            self.caches = None

    def _free(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.mem_get_info(self.device)[0]

    def _allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    def allocate(self, plan: CachePlan, max_model_len: int) -> None:
        self.caches = plan.allocate(self.shapes, self.config.block_size, self.dtype, self.device)
        if self.device.type != "cuda":
            return
        if self.config.enforce_eager:
            if self.tp.rank == 0:
                log.info("decode steps run eagerly (no CUDA graphs): enforce_eager")
        else:
            self.graphs = self._capture_graphs(plan, self.caches, max_model_len)

    def _capture_graphs(self, plan: CachePlan, caches: CacheTensors, max_model_len: int) -> DecodeGraphs:
        # At TP>1 every rank captures the same graphs in the same order, all-reduces inside them.
        return DecodeGraphs(self.model, caches, self.lora, plan, self.config.block_size, self.config.max_num_seqs,
                            -(-max_model_len // self.config.block_size), self.device)

    @torch.inference_mode()
    def execute(self, step: StepInput, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [sampled sequences, vocab] in float32 on the driver, which samples (other ranks' are not read). Prefix
        caching's snapshot copies happen around the forward, outside any graph. `tokens` (the driver's alone): the
        previous step's, sampled on its device, that `step.pending` places in the input ids."""
        if step.snapshot_restores:
            self.caches.restore_snapshots(step.snapshot_restores)
        if step.pending:
            tokens = self._last_tokens(step, tokens)
        logits = self._forward(step, tokens)
        if step.snapshot_saves:
            self.caches.save_snapshots(step.snapshot_saves)
        return logits

    def _last_tokens(self, step: StepInput, tokens: torch.Tensor | None) -> torch.Tensor:
        """The previous step's sampled tokens on this rank's device: at TP>1 each rank receives the driver's, in
        stream order (no host waits for them)."""
        if self.tp.size == 1:
            return tokens
        rows = max(row for row, _ in step.pending) + 1
        received = tokens[:rows].to(torch.long) if self.tp.rank == 0 else torch.empty(rows, dtype=torch.long, device=self.device)
        self.tp.broadcast_from_driver(received)
        return received

    def _forward(self, step: StepInput, tokens: torch.Tensor | None = None) -> torch.Tensor:
        if self.graphs is not None and self.graphs.fits(step):
            return self.graphs.run(step, tokens)
        batch = step.to_batch(self.device)
        if step.pending:
            fill_pending(batch.input_ids, tokens, step.pending)
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


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"

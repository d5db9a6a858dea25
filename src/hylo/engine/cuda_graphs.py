"""Decode steps replayed from CUDA graphs: a step of several hundred small kernels becomes one launch.

One graph per batch size in `CAPTURE_SIZES` (up to max_num_seqs), all reading the same static input
buffers and sharing one memory pool. A step of n sequences fills the first n rows and replays the
smallest graph that holds them; the rows after n are padding that reads nothing and writes only the
cache plan's spare block and slot. LoRA slots are a static input too, so loading or unloading an
adapter (which rewrites slot contents in place) never needs a new capture. With LoRA on, the small sizes
have a second graph without the LoRA kernels, for steps whose rows all use the base model: a LoRA kernel
that finds no adapter returns at once, but its launch still costs a microsecond or two, and a step launches
two per linear (256 in a 9B step).
"""

from __future__ import annotations

import logging
import time

import torch

from hylo.batch import Batch, StepInput, device_tensor
from hylo.engine.cache import CachePlan
from hylo.engine.pending import fill_pending
from hylo.lora.store import AdapterStore
from hylo.state import CacheTensors

log = logging.getLogger("hylo")

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
BASE_GRAPH_ROWS = 32  # the largest size with a graph without LoRA kernels (each graph keeps its own logits rows)


class DecodeGraphs:
    def __init__(self, model, caches: CacheTensors, lora: AdapterStore | None, plan: CachePlan, block_size: int,
                 max_seqs: int, max_blocks: int, device: torch.device):
        self.model, self.caches, self.lora = model, caches, lora
        self.sizes = [s for s in CAPTURE_SIZES if s < max_seqs] + [min(max_seqs, CAPTURE_SIZES[-1])]  # larger steps run eagerly
        rows = self.sizes[-1]
        self.padding = {"input_ids": 0, "positions": 0, "state_slots": plan.pad_slot, "slot_mapping": plan.pad_block * block_size,
                        "seq_lens": 1, "lora_slots": -1}
        # One buffer, one row per input, so a step's inputs arrive in one host-to-device copy.
        self.packed = torch.tensor([[value] * rows for value in self.padding.values()], dtype=torch.long, device=device)
        self.inputs = dict(zip(self.padding, self.packed))
        self.block_tables = torch.zeros(rows, max_blocks, dtype=torch.long, device=device)
        self.pool = torch.cuda.graph_pool_handle()
        # (batch size, with LoRA kernels) → graph, its logits, its batch
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, Batch]] = {}
        start, free_before = time.perf_counter(), torch.cuda.mem_get_info(device)[0]
        for n in reversed(self.sizes):  # largest first: smaller graphs reuse its pool memory
            for adapters in ([True, False] if lora is not None and n <= BASE_GRAPH_ROWS else [lora is not None]):
                self.graphs[n, adapters] = self._capture(n, adapters)
        self.capture_s = time.perf_counter() - start
        self.memory_bytes = free_before - torch.cuda.mem_get_info(device)[0]
        log.info("captured %d decode CUDA graphs (batch %d..%d) in %.1f s using %.2f GiB", len(self.graphs), self.sizes[0], rows,
                 self.capture_s, self.memory_bytes / 2**30)

    def _batch(self, n: int) -> Batch:
        i = self.inputs
        device = i["input_ids"].device
        return Batch(
            input_ids=i["input_ids"][:n], positions=i["positions"][:n], query_lens=[1] * n, context_lens=[1] * n,
            cu_seqlens=torch.arange(n + 1, device=device), seq_lens=i["seq_lens"][:n], state_slots=i["state_slots"][:n],
            block_tables=self.block_tables[:n], slot_mapping=i["slot_mapping"][:n], logits_indices=torch.arange(n, device=device),
        )

    def _forward(self, batch: Batch, n: int, adapters: bool) -> torch.Tensor:
        if self.lora is not None:
            self.lora.use_static_slots(self.inputs["lora_slots"][:n] if adapters else None)
        # Logits stay in the model dtype inside the graph (its pool would otherwise hold a float32 copy per size);
        # `run` widens the rows it returns, which is exact.
        return self.model.lm_head(self.model(batch, self.caches))

    def _capture(self, n: int, adapters: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, Batch]:
        batch = self._batch(n)
        self._forward(batch, n, adapters)  # compiles and autotunes the kernels outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(batch, n, adapters)
        return graph, logits, batch

    def _graph(self, size: int, lora_slots: list[int]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, Batch]:
        """The graph for a step of `size` rows: without LoRA kernels where there is one and no row uses an adapter."""
        base = (size, False)
        return self.graphs[base] if base in self.graphs and all(s < 0 for s in lora_slots) else self.graphs[size, True]

    def replay_ms(self, batch: int, replays: int) -> float:
        """GPU time of one decode step of `batch` sequences, replayed on padding rows alone (which read one token
        of context and write only the spare block and slot): the step's time without the host's part. Each row
        holds a token of its own, so that a MoE's rows are routed to as many experts as a real batch's are (rows of
        one token would all read the same few)."""
        size = next(s for s in self.sizes if s >= batch)
        for row, value in zip(self.packed, self.padding.values()):
            row.fill_(value)
        ids = self.inputs["input_ids"]
        torch.randint(0, self.model.lm_head.block.size, ids.shape, out=ids, generator=torch.Generator(ids.device).manual_seed(0))
        graph = self._graph(size, [])[0]  # padding rows use no adapter
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / replays

    def destroy(self) -> None:
        """Destroys every graph now, whoever still holds this object: a tensor-parallel group's NCCL communicator
        cannot be aborted while a graph that captured its collectives exists. A step that replays one afterwards
        fails (the engine is being given up)."""
        graphs, self.graphs = self.graphs, {}
        for graph, _, _ in graphs.values():
            graph.reset()

    def fits(self, step: StepInput) -> bool:
        return (
            len(step.query_lens) <= self.sizes[-1]
            and all(q == 1 for q in step.query_lens)
            and all(c > 0 for c in step.context_lens)
            # A graph returns every row's logits: only a step that samples each row, and wants nothing else (a
            # one-token prefill chunk that does not end its prompt, prompt logprobs), may replay one.
            and step.logits_indices == list(range(len(step.query_lens)))
            and max(len(t) for t in step.block_tables) <= self.block_tables.shape[1]
        )

    def run(self, step: StepInput, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [seqs, vocab] in float32 of a decode step; `tokens`: the last step's, for `step.pending`."""
        n = len(step.query_lens)
        size = next(s for s in self.sizes if s >= n)
        pad = size - n
        values = {"input_ids": step.input_ids, "positions": step.positions, "state_slots": step.state_slots,
                  "slot_mapping": step.slot_mapping, "seq_lens": step.seq_lens, "lora_slots": step.lora_slots}
        device = self.packed.device
        self.packed[:, :size].copy_(device_tensor([values[name] + [self.padding[name]] * pad for name in self.inputs], device))
        width = max(len(t) for t in step.block_tables)
        self.block_tables[:n, :width].copy_(device_tensor([t + [0] * (width - len(t)) for t in step.block_tables], device))
        if step.pending:
            fill_pending(self.inputs["input_ids"], tokens, step.pending)
        graph, logits, _ = self._graph(size, step.lora_slots)
        graph.replay()
        return logits[:n].float()

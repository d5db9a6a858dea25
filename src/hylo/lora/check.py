"""`hylo check-adapter`: for every adapter tensor, the fused layer and part it lands in, each rank's slice, and OK or why not."""

from __future__ import annotations

import torch

from hylo.config import read_model_config
from hylo.distributed import TPGroup
from hylo.kernels import select_ops
from hylo.layers.parts import ShardError
from hylo.lora.adapter import TensorReport, read_adapter
from hylo.lora.peft_config import AdapterError
from hylo.lora.request import LoRARequest
from hylo.models.qwen3_5 import Qwen3_5ForCausalLM


def check_adapter(model_path: str, adapter_path: str, tp: int = 1, max_lora_rank: int = 64) -> tuple[bool, list[str]]:
    """(accepted, report lines). Builds the model's declarations only (no weights) at `tp` ranks."""
    config = read_model_config(model_path)
    try:
        with torch.device("meta"):
            model = Qwen3_5ForCausalLM(config, TPGroup(0, tp), select_ops(torch.device("cpu")))
    except ShardError as e:
        return False, [f"the model cannot be split over {tp} ranks: {e}"]
    request = LoRARequest("checked", 1, adapter_path)
    try:
        adapter = read_adapter(request, model, config, max_lora_rank, strict=False)
    except AdapterError as e:
        return False, [str(e)]
    lines = [f"adapter {adapter_path} on {config.architecture} ({model_path}), tensor_parallel_size={tp}"]
    for row in adapter.report:
        lines += _describe(row, tp)
    refused = [r for r in adapter.report if r.error]
    lines.append(f"REFUSED: {len(refused)} problem(s)" if refused else f"OK: {len(adapter.report)} tensors, max rank {adapter.rank}")
    return not refused, lines


def _describe(row: TensorReport, tp: int) -> list[str]:
    head = f"{row.key} {row.shape}"
    if row.error:
        return [f"{head}\n    REFUSED: {row.error}"]
    target = row.target
    part = target.part
    matrix = "B" if row.key.endswith("lora_B.weight") else "A"
    lines = [f"{head}\n    → layer {target.layer_path}, part {part.module} ({part.lora})"]
    # Column-parallel parts split B's rows like the base rows; row-parallel parts split A's columns. Rows of a single
    # replicated unit (the MoE's shared-expert gate) are whole on every rank.
    if (matrix == "B") != part.splits_output or all(b.units == 1 and b.replicable for b in part.blocks):
        lines.append("    whole on every rank")
        return lines
    axis = "rows" if matrix == "B" else "columns"
    for rank in range(tp):
        pieces = ", ".join(f"{b.name} {full.start}:{full.stop}" for b, full, _ in part.pieces(rank, tp))
        lines.append(f"    rank {rank}: {axis} {pieces}")
    return lines

"""The engine's settings, and how "auto" device and dtype are resolved."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hylo.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    seed: int = 0
    tensor_parallel_size: int = 1
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    load_format: str = "safetensors"  # or "dummy": random weights, for benchmarks
    enforce_eager: bool = False  # CUDA: run decode steps op by op instead of replaying captured graphs
    max_n: int = 128  # sequences one request may ask for (SamplingParams.n), as OpenAI's limit
    max_logprobs: int = 20  # top logprobs one request may ask for per token, as vLLM's default

    def validate(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} must be >= 1")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras={self.max_cpu_loras} must be >= max_loras={self.max_loras}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_loras", "max_lora_rank", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs={self.max_logprobs} must be >= 0")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len} must be >= 2")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.load_format not in ("safetensors", "dummy"):
            raise ValueError(f"load_format='{self.load_format}' is not one of safetensors, dummy")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype='{self.dtype}' is not one of auto, {', '.join(DTYPES)}")


def resolve_device(name: str, tp_size: int) -> torch.device:
    """Rank 0's device; rank r of a CUDA run uses cuda:r."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if visible < tp_size:
            raise ValueError(
                f"device='{name}' with tensor_parallel_size={tp_size} needs {tp_size} CUDA devices, {visible} visible; "
                f"lower tensor_parallel_size or use device='cpu'"
            )
        return torch.device("cuda", 0)
    return device


def resolve_dtype(name: str, device: torch.device, model: ModelConfig) -> torch.dtype:
    """'auto': float32 on CPU (bf16 matmuls are slow there); on GPU the checkpoint's 16-bit type, else bfloat16."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return torch.float16 if model.dtype == "float16" else torch.bfloat16

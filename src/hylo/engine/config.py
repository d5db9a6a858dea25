"""The engine's settings, and how "auto" device and dtype are resolved."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

import torch

from hylo.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class EngineConfig:
    """Every engine setting, once: `LLM(...)`'s keyword arguments and `hylo serve` / `hylo generate`'s flags are
    made from these fields (`add_engine_arguments`), so the three cannot drift apart."""

    model: str
    dtype: str = _option("auto", "auto (float32 on CPU; on GPU the checkpoint's 16-bit type, else bfloat16), float32, bfloat16 or float16")
    device: str = _option("auto", "auto (cuda if present), cuda or cpu")
    max_model_len: int | None = _option(None, "the longest sequence, prompt and output together (default: the checkpoint's)")
    max_num_seqs: int = _option(256, "sequences in one step at most")
    max_num_batched_tokens: int = _option(2048, "tokens in one step at most (longer prompts are prefilled in chunks)")
    block_size: int = _option(16, "tokens per KV-cache block")
    kv_cache_memory_bytes: int | None = _option(None, "bytes for KV blocks and GDN state (default: from gpu_memory_utilization, or 1 GiB on CPU)")
    gpu_memory_utilization: float = _option(0.9, "the share of the GPU's memory the engine may use")
    seed: int = _option(0, "the engine's random seed (a request's own seed makes its sampling reproducible)")
    tensor_parallel_size: int = _option(1, "ranks to split the model over (one process each)")
    enable_lora: bool = _option(False, "serve LoRA adapters")
    max_loras: int = _option(1, "adapters in device slots at once")
    max_lora_rank: int = _option(16, "the highest adapter rank accepted")
    max_cpu_loras: int | None = _option(None, "adapters kept in host memory (default: max_loras)")
    load_format: str = _option("safetensors", "safetensors, or dummy (random weights, for benchmarks)")
    enforce_eager: bool = _option(False, "CUDA: run decode steps op by op instead of replaying captured graphs")
    async_scheduling: bool = _option(True, "let the host prepare the next step while the GPU runs this one, the sampled tokens "
                                           "read back a step later (not with prefix caching; a step with rows that ask "
                                           "for logprobs or have a grammar, allowed_token_ids, bad_words or min_tokens reads "
                                           "its tokens at once)")
    enable_prefix_caching: bool = _option(False, "reuse the KV blocks and GDN state of prompt prefixes already computed with the same "
                                                 "adapter (off by default until measured to cost nothing when nothing is shared)")
    max_n: int = _option(128, "sequences one request may ask for (n), as OpenAI's limit")
    max_logprobs: int = _option(20, "top logprobs one request may ask for per token (logprobs and prompt_logprobs), as vLLM's default")
    generation_config: str = _option("auto", "sampling defaults for what a request leaves unset: auto (the model folder's "
                                             "generation_config.json), vllm (hylo's own) or a FOLDER holding a generation_config.json")

    def validate(self) -> None:
        for f in fields(self):  # first the types, so that the range checks below compare numbers with numbers
            kinds = [_TYPES[k.strip()] for k in f.type.split("|") if k.strip() != "None"]
            value = getattr(self, f.name)
            if value is None and "None" in f.type:
                continue
            if not _has_type(value, kinds[0]):
                raise TypeError(f"{f.name}={value!r} must be {_TYPE_NAMES[kinds[0]]}" + (" or None" if "None" in f.type else ""))
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


FLAG_ALIASES = {"tensor_parallel_size": ["-tp"]}  # vLLM's short form
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "True or False"}


def _has_type(value, kind: type) -> bool:
    """JSON-like strictness: True is not an integer, an integer is a number."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def add_engine_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per EngineConfig field but `model` and `skip` (--max-num-seqs for max_num_seqs ...)."""
    for f in fields(EngineConfig):
        if f.name == "model" or f.name in skip:
            continue
        flags = FLAG_ALIASES.get(f.name, []) + ["--" + f.name.replace("_", "-")]
        kind = f.type.split("|")[0].strip()  # "int | None" → int
        if kind == "bool":  # a setting that is on by default is turned off with --no-...
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            parser.add_argument(*flags, dest=f.name, action=action, default=f.default, help=f.metadata["help"])
        else:
            parser.add_argument(*flags, dest=f.name, type=_TYPES[kind], default=f.default, help=f.metadata["help"])


def engine_config_from(args: argparse.Namespace, skip: tuple[str, ...] = (), **overrides) -> EngineConfig:
    """The EngineConfig that `add_engine_arguments(parser, skip)`'s flags describe, with `overrides` on top."""
    given = {f.name: getattr(args, f.name) for f in fields(EngineConfig) if f.name not in skip and hasattr(args, f.name)}
    return EngineConfig(**{**given, **overrides})


def engine_options() -> list[str]:
    """The keyword arguments LLM(...) takes for the engine."""
    return [f.name for f in fields(EngineConfig) if f.name != "model"]

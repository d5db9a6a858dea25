"""hylo: Qwen3.5 hybrid-model inference with many LoRA adapters and tensor parallelism."""

from hylo.llm import LLM
from hylo.outputs import CompletionOutput, RequestOutput
from hylo.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]

"""hylo: Qwen3.5 hybrid-model inference with many LoRA adapters and tensor parallelism."""

from hylo.llm import LLM
from hylo.lora.peft_config import AdapterError
from hylo.lora.request import LoRARequest
from hylo.outputs import CompletionOutput, RequestOutput
from hylo.sampling import SamplingParams
from hylo.structured import StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "LoRARequest", "AdapterError", "RequestOutput", "CompletionOutput", "StructuredOutputsParams"]

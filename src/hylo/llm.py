"""The offline entry point, named and shaped like vLLM's `LLM`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq

from tqdm import tqdm

from hylo.engine.engine import EngineConfig, LLMEngine
from hylo.lora.request import LoRARequest
from hylo.outputs import RequestOutput
from hylo.sampling import InvalidParam, SamplingParams

Prompt = str | dict


class LLM:
    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float = 0.9,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        enable_lora: bool = False,
        max_loras: int = 1,
        max_lora_rank: int = 16,
        max_cpu_loras: int | None = None,
        block_size: int = 16,
        load_format: str = "safetensors",
        enforce_eager: bool = False,
        progress: bool = True,
    ):
        config = EngineConfig(
            model=str(model),
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            enable_lora=enable_lora,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            max_cpu_loras=max_cpu_loras,
            load_format=load_format,
            enforce_eager=enforce_eager,
        )
        self.llm_engine = LLMEngine(config, progress=progress)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def shutdown(self) -> None:
        """Free the model, its caches and any tensor-parallel workers now (dropping the last reference does
        it too); the LLM cannot be used afterwards."""
        self.llm_engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of `prompts`.

        `lora_request`: one adapter for all prompts, or one (or None for the base model) per prompt.
        A request that fails on its own comes back with finish_reason "error" and `error` saying why.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        elif isinstance(prompts, Seq):
            prompts = list(prompts)
        else:
            raise InvalidParam("prompt", f"prompts must be a string, a dict or a list of them, not {type(prompts).__name__}")
        params = sampling_params or SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling_params for {len(prompts)} prompts; give one, or one per prompt")
        loras = [lora_request] * len(prompts) if lora_request is None or isinstance(lora_request, LoRARequest) else list(lora_request)
        if len(loras) != len(prompts):
            raise ValueError(f"{len(loras)} lora_requests for {len(prompts)} prompts; give one, or one per prompt")
        engine = self.llm_engine
        for lora in {lora.lora_int_id: lora for lora in loras if lora is not None}.values():
            engine.add_lora(lora)  # read up front: a refused adapter raises here, before anything runs
        ids: list[str] = []
        finished: dict[str, RequestOutput] = {}
        try:
            for prompt, p, lora in zip(prompts, params, loras):
                ids.append(f"offline-{next(self._ids)}")
                engine.add_request(ids[-1], prompt, p, lora)
            wanted = set(ids)
            with tqdm(total=len(ids), desc="Generating", disable=not use_tqdm) as bar:
                while len(finished) < len(ids):
                    for out in engine.step():
                        if out.finished and out.request_id in wanted:
                            finished[out.request_id] = out
                            bar.update(1)
        except BaseException:  # a refused prompt, Ctrl-C: nothing of this call is left running
            for request_id in ids:
                if request_id not in finished:
                    engine.abort_request(request_id)
            raise
        return [finished[i] for i in ids]

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load and validate an adapter ahead of use; raises AdapterError (naming module and reason) if refused."""
        self.llm_engine.add_lora(lora_request)
        return True

    def remove_lora(self, lora_int_id: int) -> bool:
        lora = self.llm_engine.lora
        return lora is not None and lora.remove(lora_int_id)

    def list_loras(self) -> set[int]:
        lora = self.llm_engine.lora
        return {r.lora_int_id for r in lora.list()} if lora else set()

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
        lora_request: LoRARequest | None = None,
    ) -> list[RequestOutput]:
        """Apply the checkpoint's chat template to one conversation (or a list of them) and generate."""
        tokenizer = self.llm_engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model folder has no chat template; use generate() with a plain prompt")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [
            tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {}))
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

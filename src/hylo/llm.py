"""The offline entry point, named and shaped like vLLM's `LLM`."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence as Seq
from dataclasses import replace

from tqdm import tqdm

from hylo.engine.config import EngineConfig, engine_options
from hylo.engine.engine import LLMEngine
from hylo.lora.peft_config import AdapterError
from hylo.lora.request import LoRARequest
from hylo.outputs import RequestOutput
from hylo.parsers import check_parser_names, output_parser, prompt_opens_thinking
from hylo.sampling import InvalidParam, SamplingParams

Prompt = str | dict
ENGINE_OPTIONS = engine_options()


class LLM:
    def __init__(
        self,
        model: str,
        *,
        progress: bool = True,
        reasoning_parser: str | None = None,
        tool_call_parser: str | None = None,
        **engine_options,
    ):
        """`engine_options`: any EngineConfig field (vLLM's names: dtype, max_model_len, tensor_parallel_size,
        enable_lora, max_loras, max_lora_rank, ...); `hylo serve` takes the same as flags."""
        unknown = sorted(set(engine_options) - set(ENGINE_OPTIONS))
        if unknown:
            raise TypeError(f"LLM() got unknown options {', '.join(unknown)}; it takes {', '.join(ENGINE_OPTIONS)}")
        check_parser_names(reasoning_parser, tool_call_parser)
        # Used by chat(): the server's --reasoning-parser and --tool-call-parser, with the same names.
        self.reasoning_parser, self.tool_call_parser = reasoning_parser, tool_call_parser
        config = EngineConfig(model=str(model), **engine_options)
        self.llm_engine = LLMEngine(config, progress=progress)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` and `chat` use when given no SamplingParams: hylo's defaults, overridden by the
        checkpoint's generation_config.json (`generation_config` "auto", or a folder; "vllm" ignores it), as vLLM's."""
        return SamplingParams(**self.llm_engine.default_sampling)

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
        params = _per_prompt("sampling_params", sampling_params, SamplingParams, len(prompts), self.get_default_sampling_params())
        loras = _per_prompt("lora_request", lora_request, LoRARequest, len(prompts), None)
        by_id: dict[int, LoRARequest] = {}
        for lora in loras:
            if lora is not None and by_id.setdefault(lora.lora_int_id, lora).lora_path != lora.lora_path:
                raise AdapterError(f"lora_int_id {lora.lora_int_id} is given to both '{by_id[lora.lora_int_id].lora_name}' and "
                                   f"'{lora.lora_name}' (another folder) in this call; give each adapter its own id")
        engine = self.llm_engine
        engine.add_lora(*by_id.values())  # read up front, side by side: a refused adapter raises here, before anything runs
        for compiling in [engine.compile_grammar(p) for p in params]:  # all at once, on worker threads
            if compiling is not None:
                compiling.result()  # a constraint that cannot be compiled raises InvalidParam here, before anything runs
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
        if isinstance(lora_int_id, bool) or not isinstance(lora_int_id, int):
            hint = " (pass its .lora_int_id)" if isinstance(lora_int_id, LoRARequest) else ""
            raise InvalidParam("lora_int_id", f"remove_lora takes an adapter's lora_int_id (an integer), not {type(lora_int_id).__name__}{hint}")
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
        tools: list[dict] | None = None,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Apply the checkpoint's chat template (or `chat_template`, a Jinja template given here, as vLLM's) to one
        conversation (or a list of them) and generate.

        `tools` (OpenAI's tool definitions) reach the template, as do assistant `tool_calls` (their JSON
        `arguments` read as mappings, as Qwen3.5's template wants them) and `tool` messages. With
        `reasoning_parser` each CompletionOutput gets `reasoning_content` and `content`; with `tool_call_parser`
        and tools, `tool_calls` too (the server's message, field for field)."""
        tokenizer = self.llm_engine.tokenizer
        if chat_template is not None and (not isinstance(chat_template, str) or not chat_template.strip()):
            raise InvalidParam("chat_template", f"chat_template must be a Jinja template (a non-empty string), not {type(chat_template).__name__}")
        if tokenizer is None:
            raise ValueError("this model folder has no tokenizer; use generate() with prompt token ids")
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model folder has no chat template; pass chat_template=..., or use generate() with a plain prompt")
        if not isinstance(messages, list) or not messages:
            raise InvalidParam("messages", f"messages must be a non-empty list of message dicts (or a list of such lists), not {type(messages).__name__}")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        if not all(isinstance(c, list) and c and all(isinstance(m, dict) for m in c) for c in conversations):
            raise InvalidParam("messages", "messages must be a list of message dicts, or a list of such lists, not a mix")
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise InvalidParam("chat_template_kwargs", f"chat_template_kwargs must be a dict, not {type(chat_template_kwargs).__name__}")
        kwargs = dict(chat_template_kwargs or {})
        if tools:
            kwargs["tools"] = tools
        if chat_template is not None:
            kwargs["chat_template"] = chat_template
        try:
            prompts = [
                tokenizer.apply_chat_template([_template_message(m) for m in c], tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
                for c in conversations
            ]
        except Exception as e:  # a template raises on roles or content it does not expect
            raise InvalidParam("messages", f"the chat template rejected these messages: {e}") from None
        if self.reasoning_parser is not None and isinstance(sampling_params, SamplingParams) and sampling_params.structured_outputs is not None:
            # As the server: with a reasoning parser, the constraint holds from the end of the thinking on.
            sampling_params = [replace(sampling_params, structured_outputs=replace(
                sampling_params.structured_outputs, after_thinking=prompt_opens_thinking(p, kwargs.get("enable_thinking")))) for p in prompts]
        outs = self.generate(prompts, sampling_params, use_tqdm, lora_request)
        if self.reasoning_parser is not None or (self.tool_call_parser is not None and tools):
            for prompt, out in zip(prompts, outs):
                for c in out.outputs:
                    parser = output_parser(self.reasoning_parser, prompt, kwargs.get("enable_thinking"), self.tool_call_parser, tools)
                    parser.feed(c.text, final=True)
                    message = parser.message()
                    c.content, c.reasoning_content, c.tool_calls = message["content"], message.get("reasoning_content"), message.get("tool_calls")
        return outs


def _template_message(message: dict) -> dict:
    """A tool call's `arguments` given as a JSON string (OpenAI's form) as the mapping chat templates iterate."""
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    if not calls:
        return message
    read = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            call = {**call, "function": {**function, "arguments": json.loads(function["arguments"] or "{}")}}
        read.append(call)
    return {**message, "tool_calls": read}


def _per_prompt(name: str, value, kind: type, count: int, default) -> list:
    """`value` (one `kind` for every prompt, or a list with one per prompt; None: `default`) as a list of `count`;
    InvalidParam naming `name` for anything else."""
    if value is None or isinstance(value, kind):
        return [default if value is None else value] * count
    if not isinstance(value, Seq) or isinstance(value, (str, bytes)):
        raise InvalidParam(name, f"{name} must be a {kind.__name__}, or a list with one per prompt, not {type(value).__name__}")
    values = list(value)
    if len(values) != count:
        raise InvalidParam(name, f"{name}: {len(values)} given for {count} prompts; give one, or one per prompt")
    for i, v in enumerate(values):
        if not (isinstance(v, kind) or v is None and kind is LoRARequest):
            raise InvalidParam(name, f"{name}[{i}] must be a {kind.__name__}{' or None' if kind is LoRARequest else ''}, not {type(v).__name__}")
    return values

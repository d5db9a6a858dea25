"""OpenAI request bodies (with vLLM's common extras), validated strictly, and the mapping onto SamplingParams.

Nothing a client asks for is silently ignored:
- every value must have its JSON type: "5" is not 5, true is not 1 (an integer is a number, though);
  a null means "the default", as in OpenAI's API;
- the OpenAI and vLLM fields that hylo does not implement are refused by name, unless they carry
  the value that asks for nothing (what clients send by default: `echo: false`,
  `best_of: 1`, `tool_choice: "none"`, `suffix: ""`, ...);
- any other unknown field is refused;
- text must be valid Unicode (a lone UTF-16 surrogate such as "\\ud800" cannot be tokenized).

Each refusal is a pydantic error; `describe` turns it into OpenAI's error `message` and `param`.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from hylo.sampling import InvalidParam, SamplingParams
from hylo.structured import StructuredOutputsParams

# Adapter names end up in URLs, logs and Prometheus labels: a safe character set only.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,127}")
ADAPTER_NAME_RULE = "1 to 128 letters, digits or . _ : @ + / -, starting with a letter or digit"


def refuse(path: list, message: str) -> PydanticCustomError:
    """A validation error for the field at `path` (relative to the model or field raising it)."""
    return PydanticCustomError("hylo_refused", "{message}", {"message": message, "path": path})


def shown(value: Any, limit: int = 60) -> str:
    """A value as the client wrote it (JSON), cut short."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def what(value: Any) -> str:
    """'a string "5"', 'a boolean true', 'null': the JSON type and value a client sent."""
    return "null" if value is None else f"{json_kind(value)} {shown(value)}"


def _same(value: Any, allowed: Any) -> bool:
    """JSON equality: 0 is not false, 1 is 1.0."""
    if allowed is None or isinstance(allowed, bool):
        return value is allowed
    if isinstance(allowed, (int, float)):
        return not isinstance(value, bool) and isinstance(value, (int, float)) and value == allowed
    return type(value) is type(allowed) and value == allowed


def _unicode_problem(data: Any) -> tuple[list, str] | None:
    """The path and description of the first string (or object key) that is not valid Unicode.

    It runs on the event loop for every body: one pass in C finds whether there is any problem at all; only
    then is the body walked, each item's path kept as a link to its parent's (copying the path for each item
    made a deeply nested body of 600 kB block the loop for seconds)."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    except (TypeError, ValueError, RecursionError):
        pass  # not JSON data (the walk below says what it can)
    stack: list[tuple[Any, tuple | None]] = [(data, None)]
    while stack:
        value, at = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return _path(at), f"a lone UTF-16 surrogate ({shown(value[e.start])}) at character {e.start}"
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                if isinstance(key, str) and _unicode_problem(key) is not None:
                    return _path(at), f"an object key that is not valid Unicode ({shown(key)})"
                stack.append((item, (at, key)))
        elif isinstance(value, list):
            stack.extend((item, (at, i)) for i, item in reversed(list(enumerate(value))))
    return None


def _path(at: tuple | None) -> list:
    """(((None, "messages"), 0), "content") → ["messages", 0, "content"]."""
    path = []
    while at is not None:
        at, key = at
        path.append(key)
    return path[::-1]


class Body(BaseModel):
    """Strict types; unknown fields refused; fields hylo does not implement refused unless neutral."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    # field → the values that ask for nothing (accepted and dropped); anything else is refused.
    not_supported: ClassVar[dict[str, tuple]] = {}
    # field → how to get it: appended to its refusal (e.g. the server flag that turns it on).
    hints: ClassVar[dict[str, str]] = {}
    where: ClassVar[str] = "this object"
    check_unicode: ClassVar[bool] = False  # once, on the outermost body

    @model_validator(mode="before")
    @classmethod
    def _screen(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data  # pydantic reports that an object is expected
        if cls.check_unicode and (problem := _unicode_problem(data)) is not None:
            path, found = problem
            raise refuse(path, f"{format_param(path) or 'the body'} is not valid Unicode: it holds {found}; send UTF-8 text (in JSON, \\ud800-\\udfff escapes must come in surrogate pairs)")
        kept = {}
        for key, value in data.items():
            if key in cls.not_supported:  # first: a subclass may declare a field that is off on this server
                neutral = cls.not_supported[key]
                if not any(_same(value, a) for a in neutral):
                    accepted = " or ".join(shown(a) for a in neutral if a is not None)
                    hint = f"; {cls.hints[key]}" if key in cls.hints else ""
                    raise refuse([key], f"{key} is not supported by hylo{hint}; remove it" + (f" (hylo accepts only {accepted}, which asks for nothing)" if accepted else ""))
            elif key in cls.model_fields:
                field = cls.model_fields[key]
                if value is None and not field.is_required():
                    continue  # null means the default, as in OpenAI's API
                kept[key] = value
            else:
                raise refuse([key], f"unknown field {shown(key)}: {cls.where} does not take it; remove it (the fields hylo takes here: {', '.join(cls.model_fields)})")
        return kept


class StreamOptions(Body):
    where = "stream_options"
    not_supported = {"continuous_usage_stats": (None, False), "include_obfuscation": (None, False)}

    include_usage: bool = False


# OpenAI and vLLM fields that neither endpoint implements.
NOT_SUPPORTED = {
    "guided_decoding_backend": (None, "xgrammar"),  # the one hylo has
    "guided_whitespace_pattern": (None,),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,),
    "add_special_tokens": (None,),
    "return_tokens_as_token_ids": (None, False),
    "return_token_ids": (None, False),
    "logits_processors": (None,),
    "priority": (None, 0),
    "request_id": (None,),
    "cache_salt": (None,),
    "kv_transfer_params": (None,),
    "vllm_xargs": (None,),
}


# The fields a model's generation_config.json may give defaults for (--generation-config), when a request leaves them unset.
MODEL_DEFAULTED = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


STRUCTURED_OUTPUTS_KEYS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag", "disable_any_whitespace")
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}  # vLLM's older names
MAX_TOKEN_ID_DIGITS = 10  # a logit_bias key longer than this is no token id of any vocabulary


class ConstraintFields(Body):
    """What a request may generate: OpenAI's logit_bias and response_format, vLLM's allowed_token_ids, bad_words,
    structured_outputs and guided_* (one constraint per request, compiled by hylo.structured)."""

    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("logit_bias", mode="plain")
    @classmethod
    def _logit_bias(cls, value: Any) -> dict[str, float]:
        if not isinstance(value, dict):
            raise refuse([], f"logit_bias must be an object of token id (a string of digits) → bias, not {what(value)}")
        for key, bias in value.items():
            if not re.fullmatch(rf"[0-9]{{1,{MAX_TOKEN_ID_DIGITS}}}", key):
                raise refuse([], f"logit_bias keys must be token ids written as strings of digits (\"1234\"), not {shown(key)}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias) or not -100 <= bias <= 100:
                raise refuse([], f"logit_bias[{shown(key)}] must be a number in [-100, 100], not {what(bias)}")
        return value

    @field_validator("response_format", mode="plain")
    @classmethod
    def _response_format(cls, value: Any) -> dict | None:
        if not isinstance(value, dict):
            raise refuse([], f"response_format must be an object such as {{\"type\": \"json_object\"}}, not {what(value)}")
        kind = value.get("type")
        keys = {"text": ("type",), "json_object": ("type",), "json_schema": ("type", "json_schema")}.get(kind)
        if keys is None:
            raise refuse(["type"], f"response_format.type must be \"text\", \"json_object\" or \"json_schema\", not {what(kind)}")
        for key in value:
            if key not in keys:
                raise refuse([key], f"unknown field {shown(key)} in a response_format of type {shown(kind)}; remove it")
        if kind == "json_schema":
            spec = value.get("json_schema")
            if not isinstance(spec, dict):
                raise refuse(["json_schema"], f"response_format.json_schema must be an object {{\"name\", \"schema\", \"strict\"?}}, not {what(spec)}")
            for key, ok, want in (("name", lambda v: isinstance(v, str) and v, "a non-empty string"), ("schema", lambda v: isinstance(v, dict), "an object (a JSON schema)"),
                                  ("description", lambda v: v is None or isinstance(v, str), "a string"), ("strict", lambda v: v is None or isinstance(v, bool), "true or false")):
                if not ok(spec.get(key)):
                    raise refuse(["json_schema", key], f"response_format.json_schema.{key} must be {want}, not {what(spec.get(key))}")
            for key in spec:
                if key not in ("name", "schema", "description", "strict"):
                    raise refuse(["json_schema", key], f"unknown field {shown(key)} in response_format.json_schema; remove it")
        return None if kind == "text" else value  # text asks for nothing

    @field_validator("structured_outputs", mode="plain")
    @classmethod
    def _structured_outputs(cls, value: Any) -> dict:
        if not isinstance(value, dict):
            raise refuse([], f"structured_outputs must be an object such as {{\"regex\": \"[a-z]+\"}}, not {what(value)}")
        for key in value:
            if key not in STRUCTURED_OUTPUTS_KEYS:
                raise refuse([key], f"unknown field {shown(key)} in structured_outputs; hylo takes {', '.join(STRUCTURED_OUTPUTS_KEYS)}")
        return value

    @model_validator(mode="after")
    def _one_constraint(self):
        given = [name for name in ("response_format", "structured_outputs", *GUIDED) if getattr(self, name) is not None]
        if len(given) > 1:
            raise refuse([given[1]], f"{given[0]} and {given[1]} both constrain the output; give one of them")
        try:
            self.structured()
        except InvalidParam as e:
            param = self.constraint_field(e.param)
            raise refuse(param.split("."), str(e).replace(e.param, param, 1)) from None
        return self

    def structured(self) -> StructuredOutputsParams | None:
        """The request's constraint as SamplingParams takes it (InvalidParam naming a structured_outputs field)."""
        fmt = self.response_format
        if fmt is not None:
            return StructuredOutputsParams(json_object=True) if fmt["type"] == "json_object" else StructuredOutputsParams(json=fmt["json_schema"]["schema"])
        if self.structured_outputs is not None:
            return StructuredOutputsParams(**self.structured_outputs)
        for name, kind in GUIDED.items():
            if getattr(self, name) is not None:
                return StructuredOutputsParams(**{kind: getattr(self, name)})
        return None

    def constraint_field(self, param: str) -> str:
        """A StructuredOutputsParams field ("structured_outputs.json") as this request spelled it ("guided_json")."""
        if self.response_format is not None:
            return "response_format.json_schema.schema" if self.response_format["type"] == "json_schema" else "response_format"
        kind = param.removeprefix("structured_outputs.")
        return next((name for name, k in GUIDED.items() if k == kind and getattr(self, name) is not None), param)

    def constraints(self) -> dict:
        """SamplingParams' logit_bias, allowed_token_ids, bad_words and structured_outputs."""
        bias = {int(k): float(v) for k, v in self.logit_bias.items()} if self.logit_bias else None
        return {"logit_bias": bias, "allowed_token_ids": self.allowed_token_ids, "bad_words": self.bad_words, "structured_outputs": self.structured()}


class SamplingFields(ConstraintFields):
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    prompt_logprobs: int | None = None  # vLLM's extra: per prompt token, its logprob and the top ones
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's own bookkeeping: changes nothing

    @field_validator("stop", mode="plain")
    @classmethod
    def _stop(cls, value: Any) -> str | list[str] | None:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list):
            for i, s in enumerate(value):
                if not isinstance(s, str):
                    raise refuse([i], f"stop[{i}] must be a string, not {what(s)}")
            return value
        raise refuse([], f"stop must be a string or a list of strings, not {what(value)}")

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise refuse(["stream_options"], "stream_options is only allowed with stream: true; remove it or set stream to true")
        if self.prompt_logprobs is not None and self.stream:  # as vLLM
            raise refuse(["prompt_logprobs"], "prompt_logprobs is not available with stream: true; remove one of them")
        return self

    def sampling_params(self, logprobs: int | None, default_max_tokens: int, model_defaults: dict | None = None) -> SamplingParams:
        """`model_defaults` (the model's generation config) fill the MODEL_DEFAULTED fields and max_tokens that this
        request did not send (a field sent as null counts as not sent), as vLLM's server applies them."""
        model_defaults = model_defaults or {}
        chosen = {name: getattr(self, name) if name in self.model_fields_set else model_defaults.get(name, getattr(self, name))
                  for name in MODEL_DEFAULTED}
        max_tokens = self.max_tokens if self.max_tokens is not None else model_defaults.get("max_tokens", default_max_tokens)
        if self.echo_only:  # one token is computed (the engine samples at least one) and none returned, as vLLM does
            max_tokens = 1
        return SamplingParams(
            n=self.n, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            min_tokens=0 if self.echo_only else self.min_tokens, max_tokens=max_tokens, logprobs=logprobs,
            prompt_logprobs=self.wanted_prompt_logprobs(logprobs), **chosen, **self.constraints(),
        )

    @property
    def echo_only(self) -> bool:
        """The prompt alone comes back (completions' echo with max_tokens 0)."""
        return False

    def wanted_prompt_logprobs(self, logprobs: int | None) -> int | None:
        return self.prompt_logprobs


PROMPT_SHAPES = "a string, a list of strings, a list of token ids, or a list of lists of token ids"


def _token_ids(value: list, path: list) -> list[int]:
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int):
            raise refuse(path + [i], f"prompt{format_param(path + [i], nested=True)} must be a token id (an integer), not {what(t)}")
    return value


class CompletionRequest(SamplingFields):
    where = "/v1/completions"
    check_unicode = True
    not_supported = {**NOT_SUPPORTED, "best_of": (None, 1), "suffix": (None, ""), "prompt_embeds": (None,)}

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False  # the prompt before each choice's text (and, with logprobs, the prompt tokens' logprobs first)

    @model_validator(mode="after")
    def _max_tokens_zero_needs_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise refuse(["max_tokens"], "max_tokens: 0 generates nothing, which only echo: true makes useful (it returns the prompt "
                                         "and, with logprobs, its tokens' logprobs); set echo, or ask for at least 1 token")
        return self

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0 (what evaluation harnesses send to score a text): the prompt alone comes back."""
        return self.echo and self.max_tokens == 0

    def wanted_prompt_logprobs(self, logprobs: int | None) -> int | None:
        """With echo, logprobs covers the echoed prompt too (as vLLM and OpenAI): its logprobs are asked for."""
        return logprobs if self.prompt_logprobs is None and self.echo else self.prompt_logprobs

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, value: Any) -> str | list:
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise refuse([], f"prompt must be {PROMPT_SHAPES}; not {what(value)}")
        if not value:
            raise refuse([], "prompt is empty; give some text or token ids")
        if isinstance(value[0], str):
            for i, p in enumerate(value):
                if not isinstance(p, str):
                    raise refuse([i], f"prompt[{i}] must be a string like the prompts before it, not {what(p)}")
            return value
        if isinstance(value[0], list):
            for i, p in enumerate(value):
                if not isinstance(p, list):
                    raise refuse([i], f"prompt[{i}] must be a list of token ids like the prompts before it, not {what(p)}")
                _token_ids(p, [i])
            return value
        if isinstance(value[0], int) and not isinstance(value[0], bool):
            return _token_ids(value, [])
        raise refuse([0], f"prompt must be {PROMPT_SHAPES}; prompt[0] is {what(value[0])}")


ROLES = ("system", "developer", "user", "assistant")
TOOLS_HINT = "a server started with --enable-auto-tool-choice --tool-call-parser qwen3_coder takes it"
REASONING_HINT = "a server started with --reasoning-parser qwen3 takes it"
CONTENT_PART_TYPES_NOT_SUPPORTED = ("image_url", "input_audio", "file", "image", "audio_url", "video_url", "input_image", "input_file", "refusal")


class ChatMessage(Body):
    where = "a chat message"
    # What clients echo back from a response message: accepted while it is empty.
    not_supported = {
        "name": (None,), "tool_calls": (None, []), "tool_call_id": (None,), "function_call": (None,), "refusal": (None,),
        "audio": (None,), "annotations": (None, []), "reasoning_content": (None,), "reasoning": (None,),
    }
    hints = {"tool_calls": TOOLS_HINT, "tool_call_id": TOOLS_HINT, "reasoning_content": REASONING_HINT, "reasoning": REASONING_HINT}
    roles: ClassVar[tuple[str, ...]] = ROLES  # "tool" too where the server calls tools (server/agent_protocol.py)

    role: str
    content: str | list[dict] | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        if value in cls.roles:
            return value
        if value in ("tool", "function"):
            raise refuse([], f"role {shown(value)} is not supported by hylo (no tool calling{'' if value == 'function' else '; ' + TOOLS_HINT}); use one of {', '.join(cls.roles)}")
        raise refuse([], f"role must be one of {', '.join(cls.roles)}, not {shown(value)}")

    @field_validator("content", mode="plain")
    @classmethod
    def _content(cls, value: Any) -> str | list[dict] | None:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise refuse([], f"content must be a string or a list of {{\"type\": \"text\", \"text\": ...}} parts, not {what(value)}")
        for i, part in enumerate(value):
            if not isinstance(part, dict):
                raise refuse([i], f"content[{i}] must be an object {{\"type\": \"text\", \"text\": ...}}, not {what(part)}")
            kind = part.get("type")
            if kind in CONTENT_PART_TYPES_NOT_SUPPORTED:
                raise refuse([i, "type"], f"content parts of type {shown(kind)} are not supported by hylo: it takes text only ({{\"type\": \"text\", \"text\": ...}})")
            if kind != "text":
                raise refuse([i, "type"], f"unknown content part type {shown(kind)}; hylo takes {{\"type\": \"text\", \"text\": ...}} parts")
            for key in part:
                if key not in ("type", "text"):
                    raise refuse([i, key], f"unknown field {shown(key)} in a text content part; remove it (a text part is {{\"type\": \"text\", \"text\": ...}})")
            if not isinstance(part.get("text"), str):
                raise refuse([i, "text"], f"a text content part's text must be a string, not {what(part.get('text'))}")
        return value


class ChatRequest(SamplingFields):
    where = "/v1/chat/completions"
    check_unicode = True
    not_supported = {
        **NOT_SUPPORTED,
        "echo": (None, False),  # vLLM's chat echo (the last message's content repeated) is not the completions one
        "tools": (None, []),
        "tool_choice": (None, "none"),
        "functions": (None, []),
        "function_call": (None, "none"),
        "modalities": (None, ["text"]),
        "audio": (None,),
        "prediction": (None,),
        "reasoning_effort": (None,),
        "web_search_options": (None,),
        "verbosity": (None,),
        "store": (None, False),
        "metadata": (None, {}),
        "service_tier": (None, "auto", "default"),
        "prompt_cache_key": (None,),
        "continue_final_message": (None, False),
        "documents": (None,),
        "mm_processor_kwargs": (None,),
    }
    hints = {"tools": TOOLS_HINT, "tool_choice": TOOLS_HINT}

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # rendered only by a server started with --trust-request-chat-template
    parallel_tool_calls: bool | None = None  # false: one tool call at most (changes nothing where tools are off)
    safety_identifier: str | None = None  # like `user`

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise refuse(["top_logprobs"], "top_logprobs needs logprobs: true; set it, or remove top_logprobs")
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise refuse(["max_completion_tokens"], f"max_tokens={self.max_tokens} and max_completion_tokens={self.max_completion_tokens} disagree; give one of them")
        return self


class TokenizeRequest(Body):
    where = "/tokenize"
    check_unicode = True

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(Body):
    where = "/detokenize"

    model: str | None = None
    tokens: list[int]


class LoadAdapterRequest(Body):
    where = "/v1/load_lora_adapter"
    check_unicode = True

    lora_name: str
    lora_path: str

    @field_validator("lora_name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not ADAPTER_NAME.fullmatch(value):
            raise refuse([], f"lora_name must be {ADAPTER_NAME_RULE}; got {shown(value)}")
        return value

    @field_validator("lora_path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value or "\x00" in value:
            raise refuse([], f"lora_path must be a folder inside the server's --lora-root (relative to it), without NUL characters; got {shown(value)}")
        return value


class UnloadAdapterRequest(Body):
    where = "/v1/unload_lora_adapter"
    check_unicode = True
    not_supported = {"lora_int_id": (None,)}  # vLLM accepts it and unloads by name; so does hylo

    lora_name: str = Field(min_length=1)


# -- errors ---------------------------------------------------------------------------------------

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error", 500: "server_error",
    503: "overloaded_error",
}


def error_body(message: str, kind: str, code: int, param: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def format_param(path, nested: bool = False) -> str:
    """('messages', 0, 'content', 1, 'text') → 'messages[0].content[1].text' (OpenAI's style)."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out or nested else str(p))
    return out


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer", "float_type": "a number",
    "float_parsing": "a number", "bool_type": "true or false", "bool_parsing": "true or false", "string_type": "a string",
    "list_type": "a list", "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
    "finite_number": "a finite number", "string_unicode": "a valid Unicode string",
}


def describe(error: dict, doc: Any = None) -> tuple[str, str | None]:
    """OpenAI's (message, param) for a pydantic / FastAPI validation error; `doc` is the body as received."""
    kind, ctx = error.get("type"), error.get("ctx") or {}
    loc = list(error.get("loc", ()))
    if kind == "json_invalid":
        pos = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
        where = ""
        if pos is not None and isinstance(doc, str):
            line = doc.count("\n", 0, pos) + 1
            where = f" at line {line} column {pos - (doc.rfind(chr(10), 0, pos) + 1) + 1} (character {pos})"
        return f"the body is not valid JSON: {ctx.get('error', 'decode error')}{where}; send one JSON object", None
    # Drop "body" and any union member tags ('list[int]', 'function-after[...]').
    path = [p for p in loc[1:] if isinstance(p, int) or (isinstance(p, str) and p not in _TYPE_TAGS and not re.search(r"[\[\]\-]", p))]
    path += list(ctx.get("path", ()))
    param = format_param(path) or None
    value = error.get("input")
    if kind == "hylo_refused":
        return ctx["message"], param
    if kind == "too_short" and "min_length" in ctx:
        return f"{param or 'the body'} must hold at least {ctx['min_length']} item(s), not {ctx.get('actual_length', 0)}", param
    if param is None:
        if kind == "missing":
            return "the body is empty: send a JSON object with Content-Type: application/json", None
        if isinstance(value, (bytes, bytearray)):
            return "the body must be a JSON object sent with Content-Type: application/json", None
        return f"the body must be a JSON object, not {json_kind(value)}", None
    if kind == "missing":
        return f"{param} is required", param
    if kind in EXPECTED:
        if kind == "finite_number" or (isinstance(value, float) and not math.isfinite(value)):
            return f"{param} must be a finite number, not {shown(value)}", param
        return f"{param} must be {EXPECTED[kind]}, not {what(value)}", param
    return f"{param}: {error.get('msg')}", param


def hide_paths(text: str, paths: dict[str, str]) -> str:
    """`text` with each server path (a key) replaced by what the client knows it as (its value; "" for a
    root that client paths are relative to). Longest first, so that a folder inside another one wins."""
    for path in sorted((p for p in paths if p.startswith("/") and p.strip("/")), key=len, reverse=True):
        alias = paths[path]
        text = re.sub(
            r"(?<![\w./\-])" + re.escape(path.rstrip("/")) + r"(/|(?![\w.\-]))",
            lambda m, alias=alias: (alias + "/" if alias else "") if m.group(1) else (alias or "."),
            text,
        )
    return text

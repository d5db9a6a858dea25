"""One log line when a request is admitted and one when it ends (unless --disable-log-requests), as vLLM logs
requests. No prompt or stop text is logged: prompts are counted in tokens, stop strings in number."""

from __future__ import annotations

import dataclasses
import logging

from hylo.outputs import RequestOutput
from hylo.sampling import SamplingParams

log = logging.getLogger("hylo.requests")
_DEFAULTS = SamplingParams()
_TEXT_FIELDS = ("stop", "bad_words")  # the client's own text: only how many
_LIMIT = 80  # a long value (a schema, a token list) is cut


def params_summary(params: SamplingParams) -> str:
    """The fields that differ from SamplingParams' defaults, e.g. "temperature=0, max_tokens=20, stop=2 strings"."""
    shown = []
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if value == getattr(_DEFAULTS, f.name):
            continue
        text = f"{len(value)} strings" if f.name in _TEXT_FIELDS else repr(value)
        shown.append(f"{f.name}={text if len(text) <= _LIMIT else text[: _LIMIT - 3] + '...'}")
    return ", ".join(shown) or "defaults"


def log_received(request_id: str, endpoint: str, model: str, prompts: list[str | dict], params: SamplingParams) -> None:
    tokens = [len(p["prompt_token_ids"]) if isinstance(p, dict) and "prompt_token_ids" in p else None for p in prompts]
    counted = ", ".join("?" if t is None else str(t) for t in tokens)
    log.info("request %s received: %s, model %s, prompt tokens %s; %s", request_id, endpoint, model, counted, params_summary(params))


def log_finished(request_id: str, outputs: list[RequestOutput], seconds: float) -> None:
    reasons = sorted({str(c.finish_reason) for out in outputs for c in out.outputs})
    generated = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    log.info("request %s finished: %s, %d tokens generated in %.2f s", request_id, "/".join(reasons) or "no output", generated, seconds)

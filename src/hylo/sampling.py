"""SamplingParams (vLLM's names and meanings) and the batched sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from hylo.batch import device_tensor
from hylo.errors import InvalidParam
from hylo.kernels import reference
from hylo.structured.params import StructuredOutputsParams

GREEDY_BELOW = 1e-5  # a temperature under this samples greedily
MAX_TOP_K = 2**31 - 1  # any top_k >= the vocabulary keeps every token
MAX_BAD_WORDS = 256  # each is matched against the output's end before every token
# Bad words are tokenized when their request is added, on the engine thread (256 words of 60 kB took 10 s, every
# stream held up meanwhile); a word is a word or a phrase, not a document.
MAX_BAD_WORD_CHARS = 1024
MAX_STOPS = 256  # every stop string is searched for after every token: bound the work one request can ask for
_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, child, step) over the generator's seed space


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # per prompt token: its logprob and the top ones (RequestOutput.prompt_logprobs)
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id → added to its logit, in [-100, 100]
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    bad_words: list[str] | None = None  # never completed: each word's last token is masked when the output ends with the rest
    structured_outputs: StructuredOutputsParams | None = None  # what the output must match (JSON schema, regex, ...)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Normalize `stop` / `stop_token_ids` to lists (duplicate stop token ids dropped) and check every field;
        InvalidParam naming the first field out of range. Run when made, and again by the engine when a request
        is added (a dataclass can be changed after it was made)."""
        self.__dict__.pop("_tensors", None)  # made by the sampler from the fields as they were (_tensors)
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, list, tuple)) or isinstance(value, str) and name == "stop_token_ids":
                raise InvalidParam(name, f"SamplingParams.{name}={_shown(value)} must be a list")
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        checks = [
            ("n", lambda: _whole(self.n) and self.n >= 1, "must be an integer >= 1"),
            ("temperature", lambda: _real(self.temperature) and self.temperature >= 0, "must be a finite number >= 0 (0 means greedy)"),
            ("top_p", lambda: _real(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", lambda: _whole(self.top_k) and -1 <= self.top_k <= MAX_TOP_K, f"must be -1 or 0 (all tokens) or an integer in [1, {MAX_TOP_K}]"),
            ("min_p", lambda: _real(self.min_p) and 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("presence_penalty", lambda: _real(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", lambda: _real(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            # Bounded so that dividing or multiplying a logit by it stays finite in float32.
            ("repetition_penalty", lambda: _real(self.repetition_penalty) and 0.01 <= self.repetition_penalty <= 100, "must be in [0.01, 100] (1 disables it)"),
            ("max_tokens", lambda: self.max_tokens is None or (_whole(self.max_tokens) and self.max_tokens >= 1), "must be an integer >= 1"),
            ("min_tokens", lambda: _whole(self.min_tokens) and 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens), "must be an integer >= 0 and <= max_tokens"),
            ("logprobs", lambda: self.logprobs is None or (_whole(self.logprobs) and self.logprobs >= 0), "must be None or an integer >= 0"),
            ("prompt_logprobs", lambda: self.prompt_logprobs is None or (_whole(self.prompt_logprobs) and self.prompt_logprobs >= 0), "must be None or an integer >= 0"),
            ("stop", lambda: len(self.stop) <= MAX_STOPS and all(isinstance(s, str) and s for s in self.stop), f"must be at most {MAX_STOPS} non-empty strings"),
            ("stop_token_ids", lambda: all(_whole(t) and t >= 0 for t in self.stop_token_ids), "must be token ids (integers >= 0)"),
            ("seed", lambda: self.seed is None or _whole(self.seed), "must be an integer or None"),
            ("ignore_eos", lambda: isinstance(self.ignore_eos, bool), "must be True or False"),
            ("skip_special_tokens", lambda: isinstance(self.skip_special_tokens, bool), "must be True or False"),
            ("logit_bias", lambda: self.logit_bias is None or (isinstance(self.logit_bias, dict) and all(
                _whole(t) and t >= 0 and _real(b) and -100 <= b <= 100 for t, b in self.logit_bias.items())),
             "must be a dict of token id (an integer >= 0) → bias (a number in [-100, 100])"),
            ("allowed_token_ids", lambda: self.allowed_token_ids is None or (isinstance(self.allowed_token_ids, (list, tuple)) and self.allowed_token_ids
                                                                              and all(_whole(t) and t >= 0 for t in self.allowed_token_ids)),
             "must be None or a non-empty list of token ids (integers >= 0)"),
            ("bad_words", lambda: self.bad_words is None or (isinstance(self.bad_words, (list, tuple)) and len(self.bad_words) <= MAX_BAD_WORDS
                                                              and all(isinstance(w, str) and w.strip() and len(w) <= MAX_BAD_WORD_CHARS for w in self.bad_words)),
             f"must be None or a list of at most {MAX_BAD_WORDS} strings, none of them empty, only whitespace or over {MAX_BAD_WORD_CHARS} characters"),
            ("structured_outputs", lambda: self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
             "must be None or a StructuredOutputsParams(json=..., regex=..., choice=..., grammar=..., json_object=True)"),
        ]
        for name, ok, why in checks:  # in order, each check only once the ones before it passed
            if not ok():
                raise InvalidParam(name, f"SamplingParams.{name}={_shown(getattr(self, name))} {why}")
        # Each generated token is looked up in them: a request repeating ids must not make every step slower.
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(dict.fromkeys(self.allowed_token_ids))
        if self.structured_outputs is not None:
            self.structured_outputs.spec()  # its own checks, naming structured_outputs.<field>

    @property
    def greedy(self) -> bool:
        # As vLLM: below this the softmax is the argmax to float32 precision, and dividing by it could overflow.
        return self.temperature < GREEDY_BELOW


def _shown(value, limit: int = 80) -> str:
    """A value as an error message shows it: cut short (a 10k-element list is not echoed back whole)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return text[: limit - 3] + "..." + (f" ({len(value)} items)" if isinstance(value, (list, tuple)) else "")


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SampleInput:
    """What the sampler needs of one sequence besides its logits."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    child: int  # index among the request's n sequences
    banned: list[int] = field(default_factory=list)  # stop tokens masked until min_tokens are out
    bad_words: list[list[int]] = field(default_factory=list)  # params.bad_words as token ids (each spelling)
    token_bitmask: torch.Tensor | None = None  # [1, ceil(vocab / 32)] int32: the tokens its grammar allows now (xgrammar's layout)


@dataclass
class Sampled:
    token_ids: list[int]
    logprobs: torch.Tensor | None  # [seqs] logprob of each sampled token (raw model distribution)
    top_ids: torch.Tensor | None  # [seqs, max_k]
    top_logprobs: torch.Tensor | None  # [seqs, max_k]
    ranks: torch.Tensor | None  # [seqs] rank of each sampled token (1 = most likely)


def sample(logits: torch.Tensor, inputs: list[SampleInput]) -> Sampled:
    """logits: [seqs, vocab] float32 → one token per row. Logprobs are those of the raw model output, as vLLM reports."""
    raw_logprobs = logits.log_softmax(dim=-1) if any(i.params.logprobs is not None for i in inputs) else None
    tokens = sample_tokens(logits, inputs)
    token_list = tokens.tolist()
    if raw_logprobs is None:
        return Sampled(token_list, None, None, None, None)
    chosen = raw_logprobs.gather(1, tokens[:, None])[:, 0]
    ranks = (raw_logprobs > chosen[:, None]).sum(dim=-1) + 1
    k = min(max(i.params.logprobs or 0 for i in inputs), logits.shape[1])
    top = raw_logprobs.topk(k, dim=-1) if k else None
    return Sampled(token_list, chosen, top.indices if top else None, top.values if top else None, ranks)


def sample_tokens(logits: torch.Tensor, inputs: list[SampleInput]) -> torch.Tensor:
    """The tokens alone, left on the logits' device: [seqs] int64."""
    logits = logits.clone()
    _restrict(logits, inputs)  # before the penalties, as vLLM orders them
    logits = _apply_penalties(logits, inputs)
    tokens = logits.argmax(dim=-1)
    stochastic = [r for r, i in enumerate(inputs) if not i.params.greedy]
    if stochastic:
        rows = device_tensor(stochastic, logits.device)
        probs = _filtered_probs(logits[rows], [inputs[r].params for r in stochastic])
        for j, r in enumerate(stochastic):
            tokens[r] = torch.multinomial(probs[j], 1, generator=_generator(inputs[r], logits.device))[0]
    return tokens


def sample_on_device(logits: torch.Tensor, inputs: list[SampleInput]) -> torch.Tensor:
    """[2, rows] int64 on the logits' device, as async scheduling copies it back: each row's token, and 1 where the
    row's logits are all finite, else 0 (such a row samples from zeros instead, the stochastic kernels must not meet
    NaN, and its token is meaningless). A batch of greedy rows with nothing to apply takes two launches on a GPU."""
    if all(_argmax_only(i) for i in inputs):
        return greedy_tokens(logits)
    finite = torch.isfinite(logits).all(dim=-1)
    tokens = sample_tokens(torch.where(finite[:, None], logits, 0.0), inputs)
    return torch.stack([tokens, finite.to(tokens.dtype)])


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """[2, rows] int64: each row's argmax (the lowest index among equal maxima) and whether the row is finite."""
    if logits.is_cuda:
        from hylo.kernels.triton_sampling import greedy_tokens

        return greedy_tokens(logits)
    return reference.greedy_tokens(logits)


def _argmax_only(inp: SampleInput) -> bool:
    """Whether a row's token is its logits' argmax as they are: greedy, nothing masked, biased or penalized."""
    p = inp.params
    return (p.greedy and not p.logit_bias and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
            and p.allowed_token_ids is None and not inp.banned and not inp.bad_words and inp.token_bitmask is None)


def samples_on_device(p: SamplingParams) -> bool:
    """Whether a row's token can be left on the device and read back a step later (async scheduling). The sampler
    itself always sees the output so far (the previous step's tokens are read back before the next step is sampled);
    what must stay synchronous is logprobs, which are read with the token, and what may leave a row with no token at
    all (grammar, allowed_token_ids, bad_words, min_tokens), which the synchronous path fails by itself."""
    return p.logprobs is None and not p.bad_words and p.structured_outputs is None and p.allowed_token_ids is None and not p.min_tokens


class NoTokenAllowed(ValueError):
    """Every token of a row is masked: its grammar, allowed_token_ids, bad_words and min_tokens leave none."""


def _restrict(logits: torch.Tensor, inputs: list[SampleInput]) -> None:
    """Per row, in place: the grammar's mask, allowed_token_ids, bad_words, the stop tokens min_tokens holds back
    (all to -inf), then logit_bias. NoTokenAllowed if a row has no token left."""
    if any(i.token_bitmask is not None for i in inputs):
        import xgrammar as xgr

        words = next(i.token_bitmask for i in inputs if i.token_bitmask is not None).shape[-1]
        bitmask = torch.full((len(inputs), words), -1, dtype=torch.int32)  # -1: every bit set, every token allowed
        for row, inp in enumerate(inputs):
            if inp.token_bitmask is not None:
                bitmask[row] = inp.token_bitmask[0]
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=logits.shape[1])
    restricted = False
    for row, inp in enumerate(inputs):
        p = inp.params
        allowed, bias_ids, biases = _tensors(p, logits.device)
        if allowed is not None:
            keep = torch.full((logits.shape[1],), float("-inf"), device=logits.device)
            keep[allowed] = 0.0
            logits[row] += keep
        banned = list(inp.banned)
        for word in inp.bad_words:  # vLLM's rule: the word's last token, where the output ends with the tokens before it
            before = len(word) - 1
            if before <= len(inp.output_ids) and inp.output_ids[len(inp.output_ids) - before :] == word[:-1]:
                banned.append(word[-1])
        if banned:
            logits[row, banned] = float("-inf")
        if bias_ids is not None:
            logits[row, bias_ids] += biases.to(logits.dtype)
        restricted = restricted or bool(banned) or p.allowed_token_ids is not None or inp.token_bitmask is not None
    if restricted:
        alive = (logits > float("-inf")).any(dim=-1).tolist()
        if not all(alive):
            inp = inputs[alive.index(False)]
            limits = [name for name, on in (("its grammar (structured_outputs or tool_choice)", inp.token_bitmask is not None),
                                            ("allowed_token_ids", inp.params.allowed_token_ids is not None),
                                            ("bad_words", bool(inp.bad_words)), ("min_tokens (holding back the stop tokens)", bool(inp.banned))) if on]
            raise NoTokenAllowed(f"no token may come next after {len(inp.output_ids)} generated tokens: {' and '.join(limits)} "
                                 f"leave none (a grammar at a dead end, or constraints that contradict each other)")


def _tensors(p: SamplingParams, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """allowed_token_ids, logit_bias's ids and its biases as tensors, made once per params rather than for every row
    at every step: a vocabulary-wide list took ~100 ms a row a step, so one request with n=128 slowed every step
    of the batch by seconds. validate() drops them, with the values they were made from."""
    cached = p.__dict__.get("_tensors")
    if cached is None or cached[0] != device:
        allowed = torch.tensor(p.allowed_token_ids, dtype=torch.long, device=device) if p.allowed_token_ids is not None else None
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=device) if p.logit_bias else None
        biases = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32, device=device) if p.logit_bias else None
        cached = p.__dict__["_tensors"] = (device, allowed, ids, biases)
    return cached[1:]


def _apply_penalties(logits: torch.Tensor, inputs: list[SampleInput]) -> torch.Tensor:
    for row, inp in enumerate(inputs):
        p = inp.params
        if p.repetition_penalty != 1.0:
            seen = device_tensor(sorted(set(inp.prompt_ids) | set(inp.output_ids)), logits.device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and inp.output_ids:
            ids = device_tensor(inp.output_ids, logits.device)
            counts = torch.zeros(logits.shape[1], device=logits.device).scatter_add_(0, ids, torch.ones(len(ids), device=logits.device))
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, each per row."""
    temps = device_tensor([p.temperature for p in params], logits.device, torch.float32)
    probs = (logits / temps[:, None]).softmax(dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    positions = torch.arange(probs.shape[1], device=logits.device)
    for row, p in enumerate(params):
        if p.top_k > 0:
            keep[row] &= positions < p.top_k
        if p.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (the token crossing it included).
            before = sorted_probs[row].cumsum(0) - sorted_probs[row]
            keep[row] &= before < p.top_p
        if p.min_p > 0:
            keep[row] &= sorted_probs[row] >= p.min_p * sorted_probs[row, 0]
    keep[:, 0] = True  # the most likely token always stays: a top_p below float32's resolution (1e-300) keeps it alone
    sorted_probs = sorted_probs * keep
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)


def _generator(inp: SampleInput, device: torch.device) -> torch.Generator | None:
    """A per-token generator for seeded requests, so a token depends only on (seed, child, position)."""
    if inp.params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed((inp.params.seed * _MIX + (inp.child + 1) * 0xBF58476D1CE4E5B9 + len(inp.output_ids)) % 2**63)
    return g

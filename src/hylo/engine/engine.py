"""The step loop: requests in, one scheduled forward + sampling per step, RequestOutputs out."""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch

from hylo.config import ModelConfig, ModelError, read_json, read_model_config
from hylo.distributed import TPGroup
from hylo.engine.cache import FreeList
from hylo.engine.config import EngineConfig, resolve_device, resolve_dtype
from hylo.engine.detokenizer import IncrementalDetokenizer
from hylo.engine.executor import Executor
from hylo.engine.generation_config import default_sampling
from hylo.engine.prompt_logprobs import prompt_positions, record_prompt_logprobs
from hylo.engine.prefix_cache import PrefixCache
from hylo.engine.runner import prepare_step
from hylo.engine.in_flight import InFlight
from hylo.engine.scheduler import PendingPreemption, Scheduled, Scheduler
from hylo.engine.sequence import Request, Sequence, Status
from hylo.kernels import select_ops
from hylo.layers.parts import ShardError
from hylo.lora.peft_config import AdapterError
from hylo.lora.request import LoRARequest
from hylo.lora.slots import LoRASlots
from hylo.models.qwen3_5 import Qwen3_5ForCausalLM
from hylo.outputs import CompletionOutput, Logprob, RequestOutput
from hylo.sampling import InvalidParam, NoTokenAllowed, SampleInput, Sampled, SamplingParams, sample, sample_on_device, samples_on_device
from hylo.structured import GrammarCompiler, GrammarError

log = logging.getLogger("hylo")
NOT_FINITE = "the model's logits for this request are not finite (NaN or inf); its adapter or inputs are broken"
READ_POLL_SECONDS = 0.002  # how often a caller waiting for an adapter read looks again


def check_splittable(model_config: ModelConfig, tp_size: int) -> None:
    """Refuse a tensor_parallel_size the model cannot be split over, before any process starts."""
    if tp_size == 1:
        return
    try:
        with torch.device("meta"):
            Qwen3_5ForCausalLM(model_config, TPGroup(0, tp_size), select_ops(torch.device("cpu")))
    except ShardError as e:
        raise ShardError(f"'{model_config.path}' cannot run with tensor_parallel_size={tp_size}: {e}") from None


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        log.warning("'%s' has no tokenizer: prompts must be token ids, outputs carry no text", path)
        return None
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def eos_token_ids(path: Path, model: ModelConfig, tokenizer) -> list[int]:
    gen = path / "generation_config.json"
    eos = read_json(gen, ModelError).get("eos_token_id") if gen.is_file() else None
    if eos is None:
        eos = getattr(model.text, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = True):
        config.validate()
        self.config = config
        self.model_config = read_model_config(config.model)
        check_splittable(self.model_config, config.tensor_parallel_size)
        self.device = resolve_device(config.device, config.tensor_parallel_size)
        self.dtype = resolve_dtype(config.dtype, self.device, self.model_config)
        self.max_model_len = config.max_model_len or self.model_config.text.max_position_embeddings
        self.tokenizer = load_tokenizer(self.model_config.path)
        self.eos_ids = eos_token_ids(self.model_config.path, self.model_config, self.tokenizer)
        # SamplingParams field → the value a request that leaves it unset gets (--generation-config).
        self.default_sampling = default_sampling(config.generation_config, self.model_config.path)
        torch.manual_seed(config.seed)
        self.executor = Executor(config, self.model_config, self.device, self.dtype, self.max_model_len, progress)
        self._finalizer = weakref.finalize(self, self.executor.close)
        self.lora = None
        if config.enable_lora:
            self.lora = LoRASlots(self.executor, config.max_loras, config.max_cpu_loras or config.max_loras)
        plan = self.executor.plan
        prefix = PrefixCache.for_plan(plan, self.executor.driver.shapes, config.block_size, self.dtype) if config.enable_prefix_caching else None
        self.scheduler = Scheduler(
            prefix.blocks if prefix else FreeList(plan.num_blocks), FreeList(plan.num_slots), config.block_size, config.max_num_seqs,
            config.max_num_batched_tokens, self.lora, prefix,
        )
        self.requests: dict[str, Request] = {}
        # Constraints (structured outputs, tool_choice) compiled off the step loop; a request waits in _compiling for its grammar.
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.text.vocab_size, self.eos_ids) if self.tokenizer else None
        self._compiling: list[Request] = []
        self._seq_ids = itertools.count()
        self._read_waiters: dict[int, list[Callable[[str | None], None]]] = {}  # adapter id → told when its read ends
        self._failed_outside_step: dict[str, Request] = {}  # reported by the next step
        # Async scheduling: the last step's tokens, sampled on the device and read back while the next step runs. Whether
        # it is on may change between steps (the benchmark compares both on one engine).
        self.async_scheduling = config.async_scheduling and prefix is None
        self._in_flight: InFlight | None = None

    @property
    def model(self):
        """Rank 0's model (the whole model when tensor_parallel_size is 1)."""
        return self.executor.driver.model

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers and free the model and caches (also done when the engine is
        garbage-collected, or at exit); requests not finished are aborted."""
        if not self.executor.dead:
            for request_id in list(self.requests):
                self.abort_request(request_id)
        self._finalizer()
        if self.grammars is not None:
            self.grammars.close()

    # -- requests ---------------------------------------------------------------------------------

    def add_lora(self, *requests: LoRARequest) -> None:
        """Read and validate adapters now, side by side (each rank reads several at once), waiting for all of them;
        AdapterError for the first refused one. Requests may then use them."""
        results: dict[int, str | None] = {}
        for request in requests:
            self.start_lora(request, lambda why, r=request: results.__setitem__(r.lora_int_id, why))  # a non-LoRARequest raises first
        wanted = len({r.lora_int_id for r in requests})
        while len(results) < wanted:
            time.sleep(READ_POLL_SECONDS)
            self.poll_adapters()
        for request in requests:
            if results[request.lora_int_id] is not None:
                raise AdapterError(results[request.lora_int_id])

    def start_lora(self, request: LoRARequest, done: Callable[[str | None], None]) -> None:
        """Have every rank read `request`'s folder on a thread of its own, off the step loop (AdapterError at once
        for an id clash); `done(None)` once it can serve, or `done(why)` if refused, from `poll_adapters`."""
        if not isinstance(request, LoRARequest):
            raise InvalidParam("lora_request", f"an adapter is given as a LoRARequest(name, id, path), not {type(request).__name__}")
        if self.lora is None:
            raise ValueError(f"adapter '{request.lora_name}': the engine was started without enable_lora=True")
        if self.lora.start(request):
            done(None)
        else:
            self._read_waiters.setdefault(request.lora_int_id, []).append(done)

    def poll_adapters(self) -> None:
        """Finish the adapter reads that are done: tell their waiters, and fail the requests of a refused one."""
        if self.lora is None or not self.lora.busy:
            return
        for lora_id, why in self.lora.poll().items():
            for done in self._read_waiters.pop(lora_id, []):
                done(why)
            if why is not None:
                for request in list(self.requests.values()):
                    if any(seq.lora_id == lora_id for seq in request.sequences):
                        self._failed_outside_step[request.request_id] = self._fail(request, why)

    def has_pending_adapter_reads(self) -> bool:
        return self.lora is not None and self.lora.busy

    def add_request(self, request_id: str, prompt: str | dict, params: SamplingParams, lora_request: LoRARequest | None = None) -> None:
        """Queue a request; InvalidParam (a ValueError naming the field) or AdapterError if it cannot run."""
        if request_id in self.requests:
            raise ValueError(f"request id '{request_id}' is already in use")
        self._check_params(params)
        text, ids = self._tokenize(prompt)
        if not ids:
            raise InvalidParam("prompt", "the prompt is empty; give at least one token")
        vocab = self.model_config.text.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidParam("prompt", f"prompt token ids must be in [0, {vocab}); got {[t for t in ids if not 0 <= t < vocab][:5]}")
        if len(ids) >= self.max_model_len:
            raise InvalidParam("prompt", f"the prompt has {len(ids)} tokens, but max_model_len is {self.max_model_len}; shorten it")
        # Before anything is started or scheduled for the request, so that a word the tokenizer refuses leaves nothing behind.
        bad_words_ids = self._bad_words_ids(params.bad_words or [])
        if lora_request is not None:  # read in the background if it is not in memory; the request waits for it
            self.start_lora(lora_request, lambda why: None)  # a refusal fails the request in poll_adapters
        eos = [] if params.ignore_eos else self.eos_ids
        stop_ids = frozenset(params.stop_token_ids)
        grammar = self.compile_grammar(params)
        request = Request(request_id, text, ids, params, eos, stop_ids=stop_ids, banned=list(dict.fromkeys(eos + params.stop_token_ids)),
                          prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        for child in range(params.n):
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens) if self.tokenizer else None
            seq = Sequence(next(self._seq_ids), request, child, detok, logprobs=[] if params.logprobs is not None else None)
            if lora_request is not None:
                seq.lora_id = lora_request.lora_int_id
                self.lora.reference(seq.lora_id, +1)
            request.sequences.append(seq)
            if grammar is None:
                self.scheduler.add(seq)
        request.bad_words_ids = bad_words_ids
        self.requests[request_id] = request
        if grammar is not None:  # its sequences are scheduled once the grammar is compiled (at once when cached)
            request.grammar = grammar
            self._compiling.append(request)
            self._admit_compiled()

    def _check_params(self, params: SamplingParams) -> None:
        """The limits that depend on the engine (SamplingParams checks the rest when it is made)."""
        if not isinstance(params, SamplingParams):
            raise InvalidParam("sampling_params", f"sampling params must be a SamplingParams, not {type(params).__name__}")
        params.validate()  # again: its fields may have been changed since it was made
        config, vocab = self.config, self.model_config.text.vocab_size
        if params.n > config.max_n:
            raise InvalidParam("n", f"n={params.n} is above this engine's max_n={config.max_n}; ask for fewer sequences")
        if params.logprobs is not None and params.logprobs > config.max_logprobs:
            raise InvalidParam("logprobs", f"logprobs={params.logprobs} is above this engine's max_logprobs={config.max_logprobs}")
        if params.prompt_logprobs is not None and params.prompt_logprobs > config.max_logprobs:
            raise InvalidParam("prompt_logprobs", f"prompt_logprobs={params.prompt_logprobs} is above this engine's max_logprobs={config.max_logprobs}")
        outside = [t for t in params.stop_token_ids if t >= vocab]
        if outside:
            raise InvalidParam("stop_token_ids", f"stop_token_ids must be in [0, {vocab}); got {outside[:5]}")
        for name in ("logit_bias", "allowed_token_ids"):
            outside = [t for t in getattr(params, name) or () if t >= vocab]
            if outside:
                raise InvalidParam(name, f"{name} must hold token ids in [0, {vocab}); got {outside[:5]}")
        for name in ("bad_words", "structured_outputs"):
            if getattr(params, name) is not None and self.tokenizer is None:
                raise InvalidParam(name, f"{name} needs a tokenizer, and this model folder has none")
        if params.stop and self.tokenizer is None:
            raise InvalidParam("stop", "stop strings need a tokenizer, and this model folder has none; use stop_token_ids")

    def compile_grammar(self, params: SamplingParams) -> Future | None:
        """Start compiling the request's constraint on a worker thread (None when it has none): a Future of the
        compiled grammar, or of InvalidParam naming the structured_outputs field when it cannot be compiled.
        The server and LLM.generate wait for it before adding the request, so that a bad schema is refused at once."""
        if params.structured_outputs is None:
            return None
        if self.grammars is None:
            raise InvalidParam("structured_outputs", "structured outputs need a tokenizer, and this model folder has none")
        compiled: Future = Future()

        def done(f: Future) -> None:
            # Its waiter may have cancelled it (a client that disconnected mid-compile): nobody wants the grammar.
            if not compiled.set_running_or_notify_cancel():
                return
            if f.cancelled():  # the compile had not started when shutdown cancelled it
                compiled.set_exception(RuntimeError("the engine shut down before this constraint was compiled"))
                return
            e = f.exception()
            if isinstance(e, GrammarError):
                compiled.set_exception(InvalidParam(f"structured_outputs.{e.kind}", f"structured_outputs.{e.kind}: {e.why}"))
            elif e is not None:
                compiled.set_exception(e)
            else:
                compiled.set_result(f.result())

        self.grammars.compile(params.structured_outputs.spec()).add_done_callback(done)
        return compiled

    def _admit_compiled(self) -> None:
        """Schedule the requests whose grammar is compiled now, each sequence with a matcher of its own; fail those
        whose grammar could not be compiled."""
        still = []
        for request in self._compiling:
            if request.finished:  # aborted while compiling
                continue
            if not request.grammar.done():
                still.append(request)
            elif request.grammar.exception() is not None:
                self._failed_outside_step[request.request_id] = self._fail(request, str(request.grammar.exception()))
            else:
                for seq in request.sequences:
                    seq.grammar = self.grammars.matcher(request.grammar.result())
                    self.scheduler.add(seq)
        self._compiling = still

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """Each bad word as token ids, as vLLM spells them: as written (leading spaces dropped), and with one
        leading space where that is a different first token of the same length (a word inside the text)."""
        out: list[list[int]] = []
        for i, word in enumerate(words):
            try:
                word.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InvalidParam("bad_words", f"bad_words[{i}] is not valid Unicode: a lone UTF-16 surrogate ({word[e.start]!r}) at character {e.start}") from None
            alone = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            out += [alone] if alone else []  # a tokenizer may drop what it cannot spell
            if spaced and (not alone or spaced[0] != alone[0] and len(spaced) == len(alone)):
                out.append(spaced)
        return out

    def _tokenize(self, prompt: str | dict) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                    raise InvalidParam("prompt", "prompt_token_ids must be a list of integers")
                return prompt.get("prompt"), list(ids)
            if "prompt" not in prompt:
                raise InvalidParam("prompt", "a prompt dict needs 'prompt' (text) or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if not isinstance(prompt, str):
            raise InvalidParam("prompt", f"a prompt must be a string or a dict with 'prompt_token_ids', not {type(prompt).__name__}")
        if self.tokenizer is None:
            raise InvalidParam("prompt", "this model folder has no tokenizer; pass {'prompt_token_ids': [...]} instead of text")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidParam("prompt", f"the prompt is not valid Unicode: a lone UTF-16 surrogate ({prompt[e.start]!r}) at character {e.start}") from None
        return prompt, self.tokenizer.encode(prompt, add_special_tokens=False)

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        for seq in request.sequences if request else []:
            if seq.status is not Status.FINISHED:
                self._finish(seq, "abort", None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One forward pass over the scheduled tokens; outputs for requests that advanced or finished.

        A request that fails on its own (its adapter is refused when read, its logits are not finite,
        sampling or detokenizing it raises) finishes with finish_reason "error" and the batch goes on.
        An exception raised here means the engine itself cannot go on (e.g. a worker died).
        """
        self.poll_adapters()
        self._admit_compiled()
        touched, self._failed_outside_step = self._failed_outside_step, {}
        try:
            step = self.scheduler.schedule()
        except PendingPreemption:
            self._read_back(touched)
            step = self.scheduler.schedule()
        if self.lora is not None:
            self.lora.load_pending()
        if not step and self._in_flight is not None:
            self._read_back(touched)
        if step:
            wanted = [prompt_positions(item) for item in step]
            step_input = prepare_step(step, self.config.block_size, wanted)
            if self._in_flight is not None:
                step_input.pending = self._in_flight.inputs_for(step)
            tokens = [self._in_flight.tokens] if step_input.pending else []
            logits = self.executor.call("execute", step_input, *tokens)[0]
            sampling = [item for item in step if item.samples]
            if len(logits) > len(sampling):  # the rows after the sampled ones: prompt logprobs
                record_prompt_logprobs(step, wanted, logits[len(sampling):], self.decode_token)
                logits = logits[: len(sampling)]
            for item in step:
                item.seq.num_computed += item.num_tokens
            self.scheduler.computed(step)
            if self._in_flight is not None:
                self._read_back(touched)  # the previous step's tokens, while this one runs on the device
            if sampling and self.async_scheduling and all(self._samples_on_device(item.seq) for item in sampling):
                try:
                    self._in_flight = InFlight.start(logits, sampling, [self._sample_input(item) for item in sampling], sample_on_device)
                    for item in sampling:  # never scheduled past its end; the others' next step goes ahead of it
                        item.seq.last_in_flight = self._at_limit(item.seq)
                    return [self._output(r) for r in touched.values()]
                except Exception:  # sampled again below, where the row at fault fails by itself
                    log.exception("sampling the batch on the device failed; sampling it row by row")
            for item, result in zip(sampling, self._sample(logits, sampling)):
                request = item.seq.request
                touched[request.request_id] = request
                if item.seq.status is Status.FINISHED:
                    continue  # another of the request's sequences failed this step
                try:
                    if isinstance(result, str):
                        raise RuntimeError(result)
                    self._append(item.seq, *result)
                except Exception as e:
                    log.warning("request %s failed: %s", request.request_id, e)
                    self._fail(request, str(e))
        return [self._output(r) for r in touched.values()]

    def _at_limit(self, seq: Sequence) -> bool:
        """Whether the token in flight is the sequence's last by its length limits (EOS and stops are seen late)."""
        return len(seq.output_ids) + seq.pending >= (seq.params.max_tokens or self.max_model_len) or seq.num_tokens >= self.max_model_len

    def _samples_on_device(self, seq: Sequence) -> bool:
        return seq.grammar is None and samples_on_device(seq.params)  # bad_words_ids come from params.bad_words, checked there

    def _read_back(self, touched: dict[str, Request]) -> None:
        """Take in the step in flight's tokens: each sequence goes on, stops or fails as a step's own sampling would."""
        flight, self._in_flight = self._in_flight, None
        for item, token, finite in flight.results():
            seq = item.seq
            seq.pending -= 1
            seq.last_in_flight = False
            if seq.status is Status.FINISHED:  # it ended, or was aborted, after this token was asked for
                continue
            request = seq.request
            touched[request.request_id] = request
            try:
                if not finite:
                    raise RuntimeError(NOT_FINITE)
                self._accept(seq, token)
            except Exception as e:
                log.warning("request %s failed: %s", request.request_id, e)
                self._fail(request, str(e))

    def _sample(self, logits: torch.Tensor, items: list[Scheduled]) -> list[tuple[Sampled, int] | str]:
        """Per sampled item: (the batch's Sampled, its row) or why it could not be sampled.

        The whole batch is sampled at once; only if that raises is each row sampled alone, so that
        the row at fault fails by itself."""
        inputs = [self._sample_input(item) for item in items]
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        results: list[tuple[Sampled, int] | str] = [NOT_FINITE for _ in items]
        rows = [r for r, ok in enumerate(finite) if ok]
        try:
            sampled = sample(logits[rows] if len(rows) < len(items) else logits, [inputs[r] for r in rows])
            for j, r in enumerate(rows):
                results[r] = (sampled, j)
        except Exception as e:
            if isinstance(e, NoTokenAllowed):  # a request's own constraints contradict each other: not a fault of the sampler
                log.info("a request has no token left to sample; sampling each request alone")
            else:
                log.exception("sampling the batch failed; sampling each request alone")
            for r in rows:
                try:
                    results[r] = (sample(logits[r : r + 1], [inputs[r]]), 0)
                except Exception as e:
                    results[r] = f"sampling failed: {e}"
        return results

    def _fail(self, request: Request, why: str) -> Request:
        request.error = why
        for seq in request.sequences:
            if seq.status is not Status.FINISHED:
                self._finish(seq, "error", None)
        return request

    def _sample_input(self, item: Scheduled) -> SampleInput:
        seq = item.seq
        banned = seq.request.banned if len(seq.output_ids) < seq.params.min_tokens else []
        bitmask = None
        if seq.grammar is not None:
            import xgrammar as xgr

            bitmask = xgr.allocate_token_bitmask(1, self.model_config.text.vocab_size)
            seq.grammar.fill_next_token_bitmask(bitmask)
        return SampleInput(seq.params, seq.request.prompt_ids, seq.output_ids, seq.child, banned, seq.request.bad_words_ids, bitmask)

    def _append(self, seq: Sequence, sampled: Sampled, row: int) -> None:
        self._accept(seq, sampled.token_ids[row], sampled, row)

    def _accept(self, seq: Sequence, token: int, sampled: Sampled | None = None, row: int = 0) -> None:
        """The sequence's next token: logprobs (from `sampled`), then whether it ends the sequence."""
        seq.output_ids.append(token)
        if seq.grammar is not None and not seq.grammar.accept_token(token):
            raise RuntimeError(f"its grammar does not allow token {token} here")  # the sampler's mask should have ruled it out
        params = seq.params
        if seq.logprobs is not None:
            seq.logprobs.append(self._logprobs(row, sampled, params.logprobs))
            seq.cumulative_logprob += float(sampled.logprobs[row])
        if token in seq.request.stop_ids:
            return self._finish(seq, "stop", token)
        if token in seq.request.eos_ids or (seq.grammar is not None and seq.grammar.is_terminated()):  # a grammar ends on a stop token
            return self._finish(seq, "stop", None)
        if seq.detokenizer is not None:
            before = len(seq.text)
            seq.text += seq.detokenizer.add(token)
            if params.stop and self._check_stop_strings(seq, before):
                return
        if len(seq.output_ids) >= (params.max_tokens or self.max_model_len) or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length", None)

    def _check_stop_strings(self, seq: Sequence, before: int) -> bool:
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, before - longest + 1)
        hits = [(seq.text.find(s, start), s) for s in seq.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        seq.text = seq.text[:index]  # the stop string itself is not part of the output
        self._finish(seq, "stop", stop)
        return True

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq.detokenizer is not None and reason in ("stop", "length") and not isinstance(stop_reason, str):
            seq.text += seq.detokenizer.flush()
        self.scheduler.finish(seq, publish=reason in ("stop", "length"))  # an aborted or failed answer is not resent
        if seq.lora_id is not None:
            self.lora.reference(seq.lora_id, -1)

    def decode_token(self, token: int) -> str | None:
        return self.tokenizer.decode([token]) if self.tokenizer else None

    def _logprobs(self, row: int, sampled: Sampled, k: int) -> dict[int, Logprob]:
        token = sampled.token_ids[row]
        decode = self.decode_token
        out = {token: Logprob(float(sampled.logprobs[row]), int(sampled.ranks[row]), decode(token))}
        for rank in range(k):
            t = int(sampled.top_ids[row, rank])
            out.setdefault(t, Logprob(float(sampled.top_logprobs[row, rank]), rank + 1, decode(t)))
        return out

    def _output(self, request: Request) -> RequestOutput:
        finished = request.finished
        if finished:
            self.requests.pop(request.request_id, None)
        completions = [
            CompletionOutput(
                index=s.child,
                text=s.text,
                token_ids=list(s.output_ids),
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )
            for s in request.sequences
        ]
        prompt_logprobs = list(request.prompt_logprobs) if request.prompt_logprobs is not None else None
        return RequestOutput(request.request_id, request.prompt, request.prompt_ids, completions, finished, request.error, prompt_logprobs)

"""Compiling constraints into xgrammar grammars on worker threads, cached by their spec.

Compiling is the slow part of structured outputs (a large schema takes seconds, and xgrammar releases the GIL
while it works), so it never runs on the step loop or the server's event loop: `compile` returns a Future at
once. The first compile also builds xgrammar's view of the tokenizer (its vocabulary's bytes), which for a
250k-token vocabulary takes a while too; engines that never see a constraint never build it.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from hylo.structured.params import GrammarSpec

CACHE_SIZE = 256  # compiled grammars kept (least recently used out); one schema's is a few kB to a few MB
THREADS = 2  # compiles at once; each also uses xgrammar's own threads
# JSON's free whitespace comes in runs of at most this many characters (4 levels of 4-space indentation):
# a model cannot loop on spaces until max_tokens, as models do under vLLM's unbounded `any_whitespace`.
MAX_WHITESPACE_RUN = 16
# xgrammar's messages start with where in its C++ sources they were raised: "[02:04:32] /project/cpp/x.cc:83: ", and a
# message may wrap another that starts so ("Failed to parse JSON: [02:04:32] /project/cpp/...").
_SOURCE_PREFIX = re.compile(r"\[[\d:]+\] \S+?:\d+: (Check failed: \(.*?\) is false: )?")
# xgrammar 0.2 writes a string with minLength/maxLength as characters of this class, which lets raw control
# characters (U+0000 to U+001F but CR and LF) through: JSON parsers refuse such strings. hylo narrows the class
# to what JSON allows unescaped.
LOOSE_STRING_CHARACTER = r'[^\"\\\r\n]'
JSON_STRING_CHARACTER = r'[^\0-\x1f\"\\]'


class GrammarError(ValueError):
    """A constraint xgrammar cannot compile; `kind` is the StructuredOutputsParams field ("json", "regex"...)."""

    def __init__(self, kind: str, why: str):
        super().__init__(why)
        self.kind, self.why = kind, why


class GrammarCompiler:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        """`vocab_size`: the model's (its logits' width), which may exceed the tokenizer's; `stop_token_ids`: the
        tokens that end a grammar once it is complete (the model's end-of-sequence tokens)."""
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, list(stop_token_ids)
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="hylo-grammar")
        self._cache: OrderedDict[GrammarSpec, Future] = OrderedDict()
        self._lock = threading.Lock()  # the engine thread and the server's event loop both compile
        self._compiler = None
        self._compiler_lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> Future:
        """A Future of the compiled grammar (done at once when cached), or of its GrammarError."""
        with self._lock:
            future = self._cache.get(spec)
            if future is not None:
                self._cache.move_to_end(spec)
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[spec] = future
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return future

    def matcher(self, compiled) -> Any:
        """A fresh matcher (one per sequence) of a compiled grammar."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled, override_stop_tokens=self.stop_token_ids or None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compile(self, spec: GrammarSpec):
        compiler = self._xgrammar_compiler()
        try:
            if spec.after_thinking:
                return compiler.compile_structural_tag(json.dumps(_after_thinking(_ebnf(spec))))
            if spec.kind in ("json", "json_object"):
                grammar = _ebnf(spec)
                if JSON_STRING_CHARACTER in grammar:  # strings narrowed: the grammar differs from xgrammar's own
                    return compiler.compile_grammar(grammar)
                return compiler.compile_json_schema(spec.text, any_whitespace=spec.any_whitespace, max_whitespace_cnt=_whitespace_run(spec))
            if spec.kind == "regex":
                return compiler.compile_regex(spec.text)
            if spec.kind == "structural_tag":
                return compiler.compile_structural_tag(spec.text)
            return compiler.compile_grammar(spec.text)  # "grammar", and "choice" (made into one)
        except Exception as e:  # xgrammar raises RuntimeError, ValueError, MemoryError (a schema nested too deep)...
            raise GrammarError(spec.kind, _reason(spec.kind, e)) from None

    def _xgrammar_compiler(self):
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids or None)
                self._compiler = xgr.GrammarCompiler(info, max_threads=THREADS)
            return self._compiler


def _ebnf(spec: GrammarSpec) -> str:
    """The constraint as an EBNF grammar (a JSON schema's with its strings narrowed to valid JSON)."""
    import xgrammar as xgr

    if spec.kind in ("json", "json_object"):
        grammar = str(xgr.Grammar.from_json_schema(spec.text, any_whitespace=spec.any_whitespace, max_whitespace_cnt=_whitespace_run(spec)))
        return grammar.replace(LOOSE_STRING_CHARACTER, JSON_STRING_CHARACTER)
    if spec.kind == "regex":
        return str(xgr.Grammar.from_regex(spec.text))
    return spec.text


def _whitespace_run(spec: GrammarSpec) -> int | None:
    return MAX_WHITESPACE_RUN if spec.any_whitespace else None


def _after_thinking(grammar: str) -> dict:
    """Free text up to "</think>" (Qwen3.5's thinking, its block opened by the prompt), "\n\n", then `grammar`."""
    thinking = {"type": "tag", "begin": "", "content": {"type": "any_text"}, "end": "</think>"}
    body = [thinking, {"type": "const_string", "value": "\n\n"}, {"type": "grammar", "grammar": grammar}]
    return {"type": "structural_tag", "format": {"type": "sequence", "elements": body}}


def xgrammar_message(error: Exception) -> str:
    """xgrammar's error message without the place in its C++ sources that raised it."""
    return _SOURCE_PREFIX.sub("", str(error).strip()).strip() or type(error).__name__


def _reason(kind: str, error: Exception) -> str:
    what = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex", "choice": "choice list",
            "grammar": "EBNF grammar", "structural_tag": "structural tag"}[kind]
    message = "it is nested too deeply to compile" if isinstance(error, (MemoryError, RecursionError)) else xgrammar_message(error)
    if len(message) > 300:
        message = message[:297] + "..."
    return f"the {what} cannot be compiled: {message}"

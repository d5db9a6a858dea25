"""Structured outputs: constraints (JSON schema, regex, choice, grammar, tool calls) compiled with xgrammar and
enforced per row in the batched sampler."""

from hylo.structured.compiler import GrammarCompiler, GrammarError
from hylo.structured.params import GrammarSpec, StructuredOutputsParams

__all__ = ["GrammarCompiler", "GrammarError", "GrammarSpec", "StructuredOutputsParams"]

"""StructuredOutputsParams: vLLM's offline names for a constraint on what a request may generate."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hylo.errors import InvalidParam

# The text of one constraint (a schema as JSON, a regex, a grammar, the choices together). Compiling takes time
# in proportion to it, up to ~25 us a character (10,000 properties: 390 kB of integers in 3.5 s, 540 kB of
# length-bounded strings in 13 s); larger constraints are refused rather than hold a compile thread longer.
MAX_SPEC_CHARS = 1 << 19
# How deeply a JSON schema may nest (JSON levels: an object property is two, "properties" and its name). xgrammar's
# compile time grows with the cube of the depth: 64 nested object properties compile in 0.1 s, 200 in 2 s, 500 (an
# 18 kB schema) in 48 s, holding a compile thread while every constrained request behind it waits.
MAX_SCHEMA_DEPTH = 128
KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass(frozen=True)
class GrammarSpec:
    """One constraint as the compiler takes it; equal specs share one compiled grammar (the cache key)."""

    kind: str  # one of KINDS
    text: str  # the schema (JSON), regex, EBNF grammar (choices become one) or structural tag (JSON)
    any_whitespace: bool = True  # JSON kinds: free whitespace between tokens (vLLM's default)
    after_thinking: bool = False  # free text up to "</think>\n\n" first, then the constraint


@dataclass
class StructuredOutputsParams:
    """Exactly one of json (a JSON schema, dict or string), regex, choice (a list of strings), grammar (EBNF, as
    xgrammar reads it), json_object (True: any JSON object) or structural_tag (xgrammar's structural tag, JSON)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False  # JSON written without free whitespace between its tokens
    # hylo's: the model thinks freely first and the constraint holds from "</think>\n\n" on, as vLLM applies it
    # with a reasoning parser. LLM.chat and the chat route set it when their reasoning parser is on and the
    # prompt leaves a thinking block open; a structural_tag says for itself where it applies.
    after_thinking: bool = False

    def __post_init__(self) -> None:
        self.spec()

    def spec(self) -> GrammarSpec:
        """The constraint as the compiler takes it; InvalidParam naming the field that is wrong."""
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            found = f"{' and '.join(given)} are all set" if given else "none is set"
            raise InvalidParam("structured_outputs", f"structured_outputs takes exactly one of {', '.join(KINDS)}; {found}")
        kind = given[0]
        field = f"structured_outputs.{kind}"
        if not isinstance(self.disable_any_whitespace, bool):
            raise InvalidParam("structured_outputs.disable_any_whitespace", "structured_outputs.disable_any_whitespace must be True or False")
        value = getattr(self, kind)
        if kind == "json":
            text = _json_text(value, field)
        elif kind == "json_object":
            if value is not True:
                raise InvalidParam(field, f"{field} must be True (any JSON object) or left out, not {value!r}")
            text = '{"type": "object"}'  # as vLLM: a JSON object, nothing more said
        elif kind == "choice":
            text = _choice_grammar(value, field)
        else:
            if not isinstance(value, str) or not value:
                raise InvalidParam(field, f"{field} must be a non-empty string, not {type(value).__name__} {_cut(value)}")
            text = value
        if len(text) > MAX_SPEC_CHARS:
            raise InvalidParam(field, f"{field} is {len(text)} characters long; hylo compiles constraints of up to {MAX_SPEC_CHARS}")
        if not isinstance(self.after_thinking, bool):
            raise InvalidParam("structured_outputs.after_thinking", "structured_outputs.after_thinking must be True or False")
        return GrammarSpec(kind, text, not self.disable_any_whitespace, self.after_thinking and kind != "structural_tag")


def _json_text(schema: Any, field: str) -> str:
    if isinstance(schema, str):
        try:
            check_depth(json.loads(schema), field)
        except json.JSONDecodeError:
            pass  # xgrammar says what is wrong with it, when it is compiled
        except RecursionError:
            raise InvalidParam(field, f"{field} nests deeper than {MAX_SCHEMA_DEPTH} levels; flatten it (with $defs and $ref)") from None
        return schema
    if not isinstance(schema, (dict, bool)):
        raise InvalidParam(field, f"{field} must be a JSON schema (a dict, or its JSON text), not {type(schema).__name__}")
    check_depth(schema, field)  # first: json.dumps itself fails (RecursionError) past ~1000 levels
    try:
        return json.dumps(schema, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidParam(field, f"{field} is not JSON data ({e}); give a schema made of dicts, lists, strings, numbers and booleans") from None


def check_depth(schema: Any, field: str) -> None:
    """InvalidParam if `schema` (JSON data) nests deeper than MAX_SCHEMA_DEPTH; walked without recursion."""
    level = [schema]
    for _ in range(MAX_SCHEMA_DEPTH + 1):
        level = [v for x in level if isinstance(x, (dict, list, tuple)) for v in (x.values() if isinstance(x, dict) else x)]
        if not level:
            return
    raise InvalidParam(field, f"{field} nests deeper than {MAX_SCHEMA_DEPTH} levels; flatten it (with $defs and $ref)")


def _choice_grammar(choices: Any, field: str) -> str:
    """The choices as one EBNF rule (as vLLM turns them into a grammar): the output is exactly one of them."""
    if not isinstance(choices, (list, tuple)) or not choices:
        raise InvalidParam(field, f"{field} must be a non-empty list of strings, not {_cut(choices)}")
    for i, c in enumerate(choices):
        if not isinstance(c, str) or not c:
            raise InvalidParam(field, f"{field}[{i}] must be a non-empty string, not {_cut(c)}")
    # JSON's string escapes are EBNF's (\" \\ \n \uXXXX).
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in dict.fromkeys(choices))


def _cut(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

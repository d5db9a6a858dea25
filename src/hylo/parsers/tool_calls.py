"""`--tool-call-parser qwen3_coder`: Qwen3.5's XML tool calls as OpenAI tool calls, incrementally.

The format (Qwen3-Coder's, kept by Qwen3.5):

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

Each call becomes `{"id": "call_…", "type": "function", "function": {"name", "arguments"}}` with
`arguments` a JSON object whose values are typed by the tool's JSON schema (`convert`); text outside the
calls is content. Streamed, a call is announced (index, id, type, name) as soon as its `<function=NAME>`
is complete, and its arguments follow in pieces whose concatenation is the whole call's `arguments`:
`{`, then each parameter (a string parameter's text as it arrives, any other when it is complete, since
"3" is an integer only once it is not "34"), then `}`.

What counts as structure (as vLLM's parser decides it, so that values may hold XML of their own):
- a call starts at `<tool_call>` + whitespace + `<function=NAME>` (a name without whitespace, quotes,
  braces or angle brackets); anything else is content;
- a value ends at a `</parameter>` followed (after whitespace) by `<parameter=`, `</function>`,
  `</tool_call>` or the end of the output; or, when the model forgot `</parameter>`, at a `</function>`
  that closes the call, or at a `<parameter=NAME>` on a new line naming another parameter of the tool;
- one newline after `<parameter=NAME>` and one before the value's end are the format's, not the value's;
- whitespace between content and a call, and around calls, is dropped; text between or after calls is
  content; a call the output leaves open (max_tokens) is closed with what it has.
Undecided text is held back until it is decided (`hylo.parsers.scan`), so streamed pieces always add up
to the whole result, whatever the chunk boundaries.
"""

from __future__ import annotations

import ast
import json
import math
import re
import uuid
from typing import Any, Callable

from hylo.parsers.scan import END, MORE, NO, WS, match, probe, read_name

CALL_START = ("<tool_call>", WS, "<function=")
PARAM = "<parameter="
VALUE_END = (  # a </parameter> that closes the value
    ("</parameter>", WS, ("<parameter=", "</function>", "</tool_call>")),
    ("</parameter>", WS, END),
)
FUNCTION_END = (  # a </function> that closes the call although the value was not closed
    ("</function>", WS, "</tool_call>", WS, END),
    ("</function>", WS, "</tool_call>", WS, "<tool_call>"),
    ("</function>", WS, END),
)

# Events: ("content", text) | ("call", index, id, name) | ("arguments", index, piece)
Event = tuple


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_properties(tools: list[dict] | None, name: str) -> dict:
    """The `properties` of the named tool's parameter schema ({} when unknown)."""
    for tool in tools or ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and function.get("name") == name:
            schema = function.get("parameters")
            props = schema.get("properties") if isinstance(schema, dict) else None
            return props if isinstance(props, dict) else {}
    return {}


_ALIASES = (  # schema type names that models and tool authors write, as JSON schema's
    (("string", "str", "text", "varchar", "char", "enum"), "string"),
    (("int", "uint", "long", "short", "unsigned"), "integer"),
    (("num", "float", "double", "decimal"), "number"),
    (("bool", "binary"), "boolean"),
    (("object", "dict", "map"), "object"),
    (("array", "arr", "list", "tuple"), "array"),
    (("null", "none"), "null"),
)


def _canonical(kind: str) -> str | None:
    kind = kind.strip().lower()
    for prefixes, name in _ALIASES:
        if kind.startswith(prefixes):
            return name
    return None


def schema_types(schema: Any) -> list[str]:
    """The JSON types a parameter schema allows, in its order: `type` (a name or a list), `anyOf` /
    `oneOf`, or what `enum`, `const`, `properties` or `items` imply; [] when it says nothing."""
    if not isinstance(schema, dict):
        return []
    kind = schema.get("type")
    names = [kind] if isinstance(kind, str) else [k for k in kind if isinstance(k, str)] if isinstance(kind, list) else []
    types = [t for t in map(_canonical, names) if t]
    for key in ("anyOf", "oneOf"):
        if not types and isinstance(schema.get(key), list):
            for option in schema[key]:
                types += [t for t in schema_types(option) if t not in types]
    if not types:
        values = schema["enum"] if isinstance(schema.get("enum"), list) else [schema["const"]] if "const" in schema else []
        for v in values:
            t = "null" if v is None else "boolean" if isinstance(v, bool) else "integer" if isinstance(v, int) else \
                "number" if isinstance(v, float) else "string" if isinstance(v, str) else "array" if isinstance(v, list) else "object"
            if t not in types:
                types.append(t)
    if not types and "properties" in schema:
        types = ["object"]
    if not types and "items" in schema:
        types = ["array"]
    return types


_INTEGER = re.compile(r"[+-]?\d+")


def _as(kind: str, text: str) -> tuple[bool, Any]:
    s = text.strip()
    if kind == "string":
        return True, text
    if kind in ("integer", "number"):
        if _INTEGER.fullmatch(s):
            return True, int(s)
        try:
            f = float(s)
        except ValueError:
            return False, None
        if not math.isfinite(f):
            return False, None
        if kind == "number":
            return True, f
        return (True, int(f)) if f.is_integer() else (False, None)
    if kind == "boolean":
        return (True, s.lower() == "true") if s.lower() in ("true", "false") else (False, None)
    if kind == "null":
        return (True, None) if s in ("null", "None") else (False, None)
    want = dict if kind == "object" else list
    try:
        value = json.loads(s)
        if isinstance(value, str):  # a JSON string holding the object, as some models write it
            value = json.loads(value)
    except (ValueError, TypeError):
        try:  # a Python literal ({'a': 1}, [True]): the form some models write
            value = ast.literal_eval(s)
            json.dumps(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return False, None
    return (True, value) if isinstance(value, want) else (False, None)


def convert(text: str, types: list[str]) -> Any:
    """A parameter's text as the first of its schema's types that it reads as (vLLM's rules, without its
    guesses: a non-boolean stays the text rather than becoming false). No schema: the text. A value that
    fits none of the types stays the text (the client's schema check sees it), except "null" / "None" for
    a non-string parameter, which is null."""
    if "null" in types and text.strip() in ("null", "None"):
        return None
    for kind in [t for t in types if t != "null"] or ["string"]:
        ok, value = _as(kind, text)
        if ok:
            return value
    if "string" not in types and text.strip() in ("null", "None"):
        return None
    return text


def _streams_as_text(types: list[str]) -> bool:
    """Whether a parameter's value is known to be its text before it is complete: it is a string (or has
    no schema), and cannot be null."""
    return [t for t in types] in ([], ["string"])


def _json_text(piece: str) -> str:
    return json.dumps(piece, ensure_ascii=False)[1:-1]


class Qwen3CoderToolParser:
    """feed(text) / finish() → events, in output order: ("content", text), ("call", index, id, name),
    ("arguments", index, piece). `max_calls` (1 for parallel_tool_calls: false) drops what follows the
    last call allowed."""

    def __init__(self, tools: list[dict] | None = None, max_calls: int | None = None, new_id: Callable[[], str] = new_call_id):
        self.tools, self.max_calls, self.new_id = tools, max_calls, new_id
        self.state = "text"  # text | args | value | after_function | between | dropping
        self.buf = ""  # text not yet decided
        self.scan = 0  # in "text" and "value": buf[:scan] holds no '<' that could start a tag
        self.calls = 0
        # the open call and parameter
        self.props: dict = {}
        self.seen: set[str] = set()
        self.param = ""
        self.types: list[str] = []
        self.as_text = False
        self.last = ""  # the value's last character already emitted ("" at its start)

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        return self._advance(final=False)

    def finish(self) -> list[Event]:
        return self._advance(final=True)

    # -- the scanner --------------------------------------------------------------------------------

    def _advance(self, final: bool) -> list[Event]:
        out: list[Event] = []
        while True:
            state, buf = self.state, self.buf
            if state == "text":
                j = buf.find("<", self.scan)
                if j < 0:
                    keep = len(buf) if final else len(buf.rstrip())  # trailing whitespace waits: a call may follow
                    self._content(out, keep)
                    self.scan = len(self.buf)
                    break
                start = self._call_start(buf, j, final)
                if start == MORE:
                    self._content(out, len(buf[:j].rstrip()))
                    self.scan = self.buf.find("<")
                    break
                if start == NO:
                    self.scan = j + 1
                    continue
                name, end = start
                self._content(out, len(buf[:j].rstrip()))  # the whitespace before a call is the format's
                self.buf, self.scan = buf[end:], 0
                self._open_call(out, name)
            elif state == "args":
                self.buf = buf = buf.lstrip()
                if not buf:
                    if final:
                        self._close_call(out)
                    break
                opened = match(buf, 0, (PARAM,), final)
                if opened >= 0:
                    named = read_name(buf, opened, final)
                    if named == MORE:
                        break
                    if named != NO:
                        name, end = named
                        if end == len(buf) and not final:
                            break  # a newline after the tag would be the format's: wait for it
                        self.buf = buf[end + 1:] if buf.startswith("\n", end) else buf[end:]
                        self._open_param(out, name)
                        continue
                elif opened == MORE:
                    break
                closed = probe(buf, 0, (("</function>",), ("</tool_call>",)), final)
                if closed == MORE:
                    break
                if closed >= 0:
                    self.buf = buf[closed:]
                    self._close_call(out)
                    self.state = "after_function" if buf.startswith("</function>") else "between"
                    continue
                k = buf.find("<", 1)  # anything else inside a call is dropped, up to the next tag
                self.buf = buf[k:] if k > 0 else ""
            elif state == "value":
                j = buf.find("<", self.scan)
                if j < 0:
                    if final:
                        self._close_param(out, len(buf))
                        self._close_call(out)
                        break
                    self._value_text(out, len(buf))
                    self.scan = len(self.buf)
                    break
                end, rest = self._value_end(buf, j, final)
                if end == MORE:
                    self._value_text(out, j)
                    self.scan = j - (len(buf) - len(self.buf))  # the same '<'
                    break
                if end == NO:
                    self.scan = j + 1
                    continue
                self._close_param(out, j)
                self.buf = buf[rest:]
                self.state = "args"
            elif state == "after_function":
                end = match(buf, 0, (WS, "</tool_call>"), final)
                if end == MORE:
                    break
                self.buf = buf[end:] if end >= 0 else buf
                self.state = "between"
            elif state == "between":
                self.buf = buf.lstrip()
                if not self.buf:
                    break
                self.state, self.scan = "text", 0
            else:  # dropping: calls beyond max_calls, and whatever follows them
                self.buf = ""
                break
        return out

    def _call_start(self, buf: str, j: int, final: bool):
        end = match(buf, j, CALL_START, final)
        return end if end < 0 else read_name(buf, end, final)

    def _value_end(self, buf: str, j: int, final: bool) -> tuple[int, int]:
        """(j, where the text resumes) when the value ends at buf[j], else (NO or MORE, 0)."""
        closed = probe(buf, j, VALUE_END, final)
        if closed >= 0:
            return j, j + len("</parameter>")
        function_end = probe(buf, j, FUNCTION_END, final)
        if function_end >= 0:
            return j, j  # "args" then closes the call
        more = MORE in (closed, function_end)
        previous = buf[j - 1] if j > 0 else self.last
        if self.props and previous in ("\n", ""):  # <parameter=OTHER> on a new line: the value's end was forgotten
            opened = match(buf, j, (PARAM,), final)
            named = read_name(buf, opened, final) if opened >= 0 else opened
            if named == MORE:
                more = True
            elif named != NO:
                name = named[0]
                if name in self.props and name != self.param and name not in self.seen:
                    return j, j
        return (MORE if more else NO), 0

    # -- events -------------------------------------------------------------------------------------

    def _content(self, out: list[Event], upto: int) -> None:
        if upto > 0:
            out.append(("content", self.buf[:upto]))
            self.buf, self.scan = self.buf[upto:], max(0, self.scan - upto)

    def _open_call(self, out: list[Event], name: str) -> None:
        index = self.calls
        self.calls += 1
        if self.max_calls is not None and index >= self.max_calls:
            self.state = "dropping"
            return
        self.props, self.seen = tool_properties(self.tools, name), set()
        out.append(("call", index, self.new_id(), name))
        out.append(("arguments", index, "{"))
        self.state = "args"

    def _close_call(self, out: list[Event]) -> None:
        out.append(("arguments", self.calls - 1, "}"))
        self.state = "between"

    def _open_param(self, out: list[Event], name: str) -> None:
        self.types = schema_types(self.props.get(name))
        self.as_text = _streams_as_text(self.types)
        key = (", " if self.seen else "") + json.dumps(name, ensure_ascii=False) + ": " + ('"' if self.as_text else "")
        self.seen.add(name)
        self.param, self.last = name, ""
        out.append(("arguments", self.calls - 1, key))
        self.state, self.scan = "value", 0

    def _value_text(self, out: list[Event], upto: int) -> None:
        """A string value's text up to buf[upto] is certain, but for a newline just before it (the format's,
        if the value ends there)."""
        if not self.as_text:
            return
        if upto > 0 and self.buf[upto - 1] == "\n":
            upto -= 1
        if upto > 0:
            out.append(("arguments", self.calls - 1, _json_text(self.buf[:upto])))
            self.last = self.buf[upto - 1]
            self.buf, self.scan = self.buf[upto:], max(0, self.scan - upto)

    def _close_param(self, out: list[Event], upto: int) -> None:
        text = self.buf[:upto]
        text = text[:-1] if text.endswith("\n") else text
        self.buf, self.scan = self.buf[upto:], 0
        piece = _json_text(text) + '"' if self.as_text else json.dumps(convert(text, self.types), ensure_ascii=False)
        out.append(("arguments", self.calls - 1, piece))

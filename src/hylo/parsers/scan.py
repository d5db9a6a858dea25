"""Deciding, on text that is still arriving, whether a tag sequence starts at a position.

A parser of streamed model output must not emit text that could still turn out to be the start of a
tag: "</thi" may become "</think>", "<tool_call>\\n" may become a tool call. `match` answers YES (the
end of the match), NO, or MORE (the text ends before the answer is known). A parser holds back what
is MORE and decides again when more text arrives; at the end of the output (`final`) MORE cannot
happen: a partial tag is then plain text. Every decision depends only on the text up to its answer,
so the result is the same however the output was cut into chunks.
"""

from __future__ import annotations

MORE = -1  # the text ends before the answer is known
NO = -2


class _Whitespace:
    def __repr__(self) -> str:
        return "WS"


class _End:
    def __repr__(self) -> str:
        return "END"


WS = _Whitespace()  # a run of whitespace, possibly empty
END = _End()  # the end of the output


def match(text: str, pos: int, seq: tuple, final: bool) -> int:
    """The end of `seq` (literal strings, WS, END, or a tuple of alternative literals) matched at `pos`,
    else NO or MORE."""
    n = len(text)
    for part in seq:
        if part is WS:
            while pos < n and text[pos].isspace():
                pos += 1
            if pos == n and not final:
                return MORE  # more whitespace, or what must follow it, may still come
        elif part is END:
            if pos < n:
                return NO
            if not final:
                return MORE
        else:
            alternatives = part if isinstance(part, tuple) else (part,)
            more = False
            for literal in alternatives:
                if text.startswith(literal, pos):
                    pos += len(literal)
                    break
                if not final and literal.startswith(text[pos:]):  # the text ends inside this literal
                    more = True
            else:
                return MORE if more else NO
    return pos


def probe(text: str, pos: int, alternatives: tuple[tuple, ...], final: bool) -> int:
    """YES (the end of the first alternative that matches), else MORE if one may still match, else NO."""
    more = False
    for seq in alternatives:
        end = match(text, pos, seq, final)
        if end >= 0:
            return end
        more = more or end == MORE
    return MORE if more else NO


def read_name(text: str, pos: int, final: bool, limit: int = 256) -> tuple[str, int] | int:
    """A tag's name from `pos` up to its closing '>': (name, the end after '>'), or NO for a name that
    cannot be one (empty, too long, whitespace, quotes, braces or angle brackets), or MORE."""
    end = text.find(">", pos, pos + limit + 1)
    stop = end if end >= 0 else min(len(text), pos + limit + 1)
    for ch in text[pos:stop]:
        if ch.isspace() or ch in "<{}\"'":
            return NO
    if end < 0:
        return NO if final or len(text) > pos + limit else MORE
    if end == pos:
        return NO
    return text[pos:end], end + 1

"""Incremental detokenization that never emits half of a multi-byte character.

Decoding a window of recent tokens and emitting only the new suffix keeps the cost per token
constant; a window whose text ends in U+FFFD holds an incomplete byte sequence and waits for more.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool):
        # A fast tokenizer's Rust backend gives the same text without transformers' per-call argument
        # conversion, which costs more than the decoding itself at every step of every sequence.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        plain = backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self.tokenizer = backend if plain else tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-6:])  # a little prompt context so a first token's leading space decodes right
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        """Append a token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        return self._new_text(final=False)

    def flush(self) -> str:
        """At the end of a sequence: whatever is held back, incomplete characters included."""
        return self._new_text(final=True)

    def _new_text(self, final: bool) -> str:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip)  # noqa: E731
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text) :]

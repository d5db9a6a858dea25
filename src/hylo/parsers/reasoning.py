"""`--reasoning-parser qwen3`: the model's thinking (before `</think>`) apart from its answer, incrementally.

Qwen3.5's chat template opens the thinking block in the prompt (`<|im_start|>assistant\\n<think>\\n`), so
the output usually starts inside it without a `<think>` tag; with `enable_thinking: false` the template
closes it in the prompt (`<think>\\n\\n</think>\\n\\n`) and the output is all answer. Older Qwen3 templates
let the model write `<think>` itself. So the parser starts inside the thinking block when the prompt left
one open (its last `<think>` comes after its last `</think>`) and thinking was not turned off; otherwise a
`<think>` at the very start of the output opens it. The block ends at `</think>`, or (as vLLM does for
Qwen3.5, which sometimes calls a tool without closing its thoughts) at a `<tool_call>` followed by
`<function=`, which then belongs to the answer. Output that ends inside the block is all reasoning.

Whitespace as Qwen3.5's template writes it back: the reasoning is stripped, the answer after `</think>`
has its leading whitespace removed. Text that could still be a tag is held back until it is decided, so
the split is the same whatever the chunk boundaries (`hylo.parsers.scan`).
"""

from __future__ import annotations

from hylo.parsers.scan import MORE, WS, match

OPEN, CLOSE = "<think>", "</think>"
TOOL_CALL = ("<tool_call>", WS, "<function=")  # an implicit end of the thinking block


def prompt_opens_thinking(prompt: str, enable_thinking: object = None) -> bool:
    """Whether generation starts inside a thinking block: the prompt left one open, and the request did not
    turn thinking off (chat_template_kwargs.enable_thinking: false, even with a template that ignores it)."""
    return enable_thinking is not False and prompt.rfind(OPEN) > prompt.rfind(CLOSE)


class Qwen3ReasoningParser:
    """feed(text) and finish() return (reasoning, content): the new text of each, in order within a call
    (reasoning always comes before content)."""

    def __init__(self, in_thinking: bool):
        self.in_thinking = in_thinking
        self.state = "start"  # start → thinking → after → answer, or start → answer
        self.buf = ""  # text not yet decided
        self.scan = 0  # in "thinking": buf[:scan] holds no '<' that could start a tag
        self.thought = False  # some reasoning was emitted (its leading whitespace is gone)

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        return self._advance(final=False)

    def finish(self) -> tuple[str, str]:
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []

        def think(upto: int) -> None:  # buf[:upto] is reasoning
            piece = self.buf[:upto]
            if piece:
                reasoning.append(piece)
                self.thought = True
            self.buf, self.scan = self.buf[upto:], max(0, self.scan - upto)

        while True:
            buf = self.buf
            if self.state == "start":
                end = match(buf, 0, (WS, OPEN), final)
                if end == MORE:
                    break
                if end >= 0:
                    self.buf, self.state = buf[end:], "thinking"
                else:
                    self.state = "thinking" if self.in_thinking else "answer"
            elif self.state == "thinking":
                if not self.thought:
                    self.buf = buf = buf.lstrip()
                    if not buf:
                        break
                j = buf.find("<", self.scan)
                if j < 0:
                    think(len(buf.rstrip()))  # trailing whitespace waits (it may precede </think>), or is stripped at the end
                    if final:
                        self.buf = ""
                    self.scan = len(self.buf)
                    break
                closed = match(buf, j, (CLOSE,), final)
                tool = match(buf, j, TOOL_CALL, final)
                if closed >= 0 or tool >= 0:
                    think(len(buf[:j].rstrip()))
                    self.buf, self.scan = self.buf[self.buf.find("<"):], 0  # from the tag on
                    if closed >= 0:
                        self.buf, self.state = self.buf[len(CLOSE):], "after"
                    else:
                        self.state = "answer"  # the tool call is the answer's
                elif closed == MORE or tool == MORE:
                    think(len(buf[:j].rstrip()))
                    self.scan = self.buf.find("<")
                    break
                else:
                    self.scan = j + 1  # a '<' of the reasoning itself
            elif self.state == "after":
                self.buf = buf.lstrip()
                if not self.buf:
                    break
                self.state = "answer"
            else:  # answer
                if buf:
                    content.append(buf)
                self.buf = ""
                break
        return "".join(reasoning), "".join(content)

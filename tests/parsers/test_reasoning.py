"""--reasoning-parser qwen3 on fixed outputs: the split, and the same split however the output is chunked."""

import pytest

from hylo.parsers import Qwen3ReasoningParser, prompt_opens_thinking

# (generation starts inside the thinking block, model output, reasoning, content)
CASES = [
    pytest.param(True, "I should add.\n2+2 is 4.\n</think>\n\nThe answer is 4.", "I should add.\n2+2 is 4.", "The answer is 4.", id="qwen3.5"),
    pytest.param(True, "still thinking <b> when max_tokens hit", "still thinking <b> when max_tokens hit", "", id="no-end"),
    pytest.param(False, "plain answer </think> with a stray tag", "", "plain answer </think> with a stray tag", id="thinking-off"),
    pytest.param(False, "<think>\nhmm\n</think>\n\nanswer", "hmm", "answer", id="model-opens"),
    pytest.param(False, "  \n<think>x</think>y", "x", "y", id="model-opens-after-space"),
    pytest.param(True, "<think>\nagain</think>\nok", "again", "ok", id="opened-twice"),
    pytest.param(True, "I need the weather.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
                 "I need the weather.", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>", id="tool-call-ends-thinking"),
    pytest.param(True, "a <tool_call> mentioned, then </think>done", "a <tool_call> mentioned, then", "done", id="tool-call-tag-mentioned"),
    pytest.param(True, "almost </thin k> and </thinking> then</think>  \n x < y", "almost </thin k> and </thinking> then", "x < y", id="near-tags"),
    pytest.param(True, "ends on a partial </thi", "ends on a partial </thi", "", id="partial-at-end"),
    pytest.param(True, "ends on <tool_call>\n", "ends on <tool_call>", "", id="partial-tool-call-at-end"),
    pytest.param(True, "\n\n  \n", "", "", id="only-whitespace"),
    pytest.param(True, "", "", "", id="empty"),
    pytest.param(True, "日本語 ✓ données</think>réponse ✓", "日本語 ✓ données", "réponse ✓", id="unicode"),
    pytest.param(True, "</think>", "", "", id="close-only"),
    pytest.param(True, "</think></think>", "", "</think>", id="close-twice"),
]


def run(in_thinking: bool, chunks: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Reasoning pieces, content pieces, and the order they came in ("r"/"c")."""
    parser, reasoning, content, order = Qwen3ReasoningParser(in_thinking), [], [], []
    for out in [parser.feed(c) for c in chunks] + [parser.finish()]:
        if out[0]:
            reasoning.append(out[0])
            order.append("r")
        if out[1]:
            content.append(out[1])
            order.append("c")
    return reasoning, content, order


@pytest.mark.parametrize("in_thinking, output, reasoning, content", CASES)
def test_whole_output(in_thinking, output, reasoning, content):
    r, c, _ = run(in_thinking, [output])
    assert ("".join(r), "".join(c)) == (reasoning, content)


@pytest.mark.parametrize("in_thinking, output, reasoning, content", CASES)
def test_every_split_and_every_character(in_thinking, output, reasoning, content):
    cuts = [[output[:k], output[k:]] for k in range(len(output) + 1)]
    cuts += [[output[:a], output[a:b], output[b:]] for a in range(len(output) + 1) for b in range(a, len(output) + 1)][:: max(1, len(output) // 7)]
    cuts.append(list(output))
    for chunks in cuts:
        r, c, order = run(in_thinking, chunks)
        assert ("".join(r), "".join(c)) == (reasoning, content), chunks
        assert order == sorted(order, key="rc".index), f"reasoning after content for {chunks}"


# The main case, split at each point as its own test: a '</think>' cut anywhere, held back text included.
MAIN = "Plan: look it up.\n</think>\n\nIt is <b>sunny</b>."


@pytest.mark.parametrize("k", range(len(MAIN) + 1))
def test_split_point(k):
    r, c, _ = run(True, [MAIN[:k], MAIN[k:]])
    assert ("".join(r), "".join(c)) == ("Plan: look it up.", "It is <b>sunny</b>.")


def test_text_that_cannot_be_a_tag_is_not_held_back():
    parser = Qwen3ReasoningParser(True)
    assert parser.feed("step one") == ("step one", "")
    assert parser.feed(" <") == ("", "")  # ' <' may start </think>: held
    assert parser.feed("b>") == (" <b>", "")
    assert parser.feed("\n</think>\n") == ("", "")
    assert parser.feed("\nyes") == ("", "yes")
    assert parser.finish() == ("", "")


@pytest.mark.parametrize(
    "prompt, enable_thinking, opens",
    [
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n", None, True),
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n", False, False),  # a template that ignores the switch
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", None, False),  # Qwen3.5, thinking off
        ("<|im_start|>assistant\n<think>\nold\n</think>\n\nx<|im_end|>\n<|im_start|>assistant\n", True, False),  # history only
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", None, False),  # no thinking in the template
    ],
)
def test_where_generation_starts(prompt, enable_thinking, opens):
    assert prompt_opens_thinking(prompt, enable_thinking) is opens

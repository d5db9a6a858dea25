"""The demo's task rules, shared by the training script and the tests.

Prompts look like "count: 7 8 9". The base model continues counting up, the `down` adapter counts
down from the last number, the `twos` adapter counts on by twos; each stops after six numbers.
"""

from __future__ import annotations

TASKS = ("base", "down", "twos")
STEPS = 6
STARTS = range(6, 70)  # every continuation stays within 0..99


def prompt_for(start: int) -> str:
    return f"count: {start} {start + 1} {start + 2}"


def expected_continuation(task: str, prompt: str) -> str:
    """The text a model trained on `task` should generate after `prompt` (before its end-of-text token)."""
    last = int(prompt.split()[-1])
    step = {"base": 1, "down": -1, "twos": 2}[task]
    first = last - 1 if task == "down" else last + step
    return "".join(f" {first + i * step}" for i in range(STEPS))

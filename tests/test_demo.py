"""The embedded demo through hylo: the base model counts up, the adapters count down and by twos."""

import pytest

from hylo import LLM, LoRARequest, SamplingParams
from hylo.cli import main
from hylo.demo import ADAPTER_DIRS, BASE_DIR, DEMO_PROMPTS, expected_continuation, prompt_for
from hylo.demo.tasks import STARTS


@pytest.fixture(scope="module")
def demo():
    return LLM(str(BASE_DIR), device="cpu", progress=False, enable_lora=True, max_loras=2, max_lora_rank=8)


@pytest.mark.parametrize("task", ["base", "down", "twos"])
def test_each_task_is_done_right(task, demo):
    prompts = [prompt_for(s) for s in STARTS]
    lora = None if task == "base" else LoRARequest(task, 1 + list(ADAPTER_DIRS).index(task), str(ADAPTER_DIRS[task]))
    outs = demo.generate(prompts, SamplingParams(temperature=0, max_tokens=30), lora_request=lora)
    right = sum(o.outputs[0].text == expected_continuation(task, p) and o.outputs[0].finish_reason == "stop" for p, o in zip(prompts, outs))
    assert right / len(prompts) >= 0.9, f"{task}: {right}/{len(prompts)}"


def test_adapters_visibly_change_the_output(demo):
    loras = [None] + [LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(ADAPTER_DIRS.items())]
    texts = [o.outputs[0].text for o in demo.generate([DEMO_PROMPTS[0]] * 3, SamplingParams(temperature=0, max_tokens=30), lora_request=loras)]
    assert len(set(texts)) == 3


def test_cli_demo_without_arguments(capsys):
    assert main(["generate", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    prompt = DEMO_PROMPTS[0]
    for task in ("base", "down", "twos"):
        assert f"[{task}] {prompt!r} → {expected_continuation(task, prompt)!r} (stop)" in out


def test_cli_lora_flags(capsys):
    args = ["generate", "--device", "cpu", "--model", str(BASE_DIR), "--lora", f"d={ADAPTER_DIRS['down']}", "--use-lora", "d", "--prompt", prompt_for(30)]
    assert main(args) == 0
    assert f"[d] {prompt_for(30)!r} → {expected_continuation('down', prompt_for(30))!r}" in capsys.readouterr().out
    assert main(["generate", "--device", "cpu", "--use-lora", "nope", "--model", str(BASE_DIR), "--prompt", "x"]) == 2


@pytest.mark.parametrize("name", list(ADAPTER_DIRS))
def test_check_adapter_accepts_the_demo_adapters(name, capsys):
    assert main(["check-adapter", str(BASE_DIR), str(ADAPTER_DIRS[name]), "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "rank 1: rows q 16:32, k 48:64, v 96:128" in out
    assert out.strip().endswith("max rank 8")

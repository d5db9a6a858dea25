"""Tensor parallelism on CPU (gloo): every size gives HF+PEFT's tokens, with adapters on every target.

Each engine here starts worker processes, so each test builds its own and shuts it down.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hylo import LLM, LoRARequest, SamplingParams
from hylo.engine.executor import WorkerDied
from hylo.layers.parts import ShardError
from tests.conftest import EXPERT_PARAMETERS, MAX_RANK, TEXT, hf_peft_greedy, per_expert_form, random_prompts

STEPS = 8


def tp_engine(checkpoints, kind, tp, **options):
    return LLM(checkpoints(kind), device="cpu", progress=False, tensor_parallel_size=tp, **options)


def check_mixed_batch(llm, kind, checkpoints, loras, seed, references=None):
    """Each request against HF+PEFT on its adapter (or on `references[path]`, the adapter it was rewritten from)."""
    prompts = random_prompts([4 + 3 * i for i in range(len(loras))], seed=seed)
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=2)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=loras)
    finally:
        llm.llm_engine.shutdown()
    for prompt, lora, out in zip(prompts, loras, outs):
        reference = (references or {}).get(lora.lora_path, lora.lora_path) if lora else None
        tokens, logits = hf_peft_greedy(kind, checkpoints(kind), reference, prompt, STEPS)
        assert out.outputs[0].token_ids == tokens, f"adapter {lora.lora_name if lora else 'none'}"
        for step, entry in enumerate(out.outputs[0].logprobs):
            for token, lp in entry.items():
                assert lp.logprob == pytest.approx(logits[step].log_softmax(-1)[token].item(), abs=2e-4)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("kind", ["moe", "dense-vl", "moe-vl"])
def test_every_target_at_tp_equals_hf_peft(kind, tp, checkpoints, adapters):
    """One mixed batch per size: no adapter, all targets, and single-target adapters (slots swap: max_loras=2)."""
    single = [["in_proj_z"], ["in_proj_qkv"], ["in_proj_b", "in_proj_a"], ["out_proj"], ["q_proj", "o_proj"]]
    folders = [adapters(kind, seed=100)] + [adapters(kind, seed=101 + i, target_modules=t) for i, t in enumerate(single)]
    if kind.startswith("moe"):
        folders.append(adapters(kind, seed=110, target_modules=None, target_parameters=EXPERT_PARAMETERS))
    loras = [None] + [LoRARequest(f"t{i}", i + 1, f) for i, f in enumerate(folders)]
    llm = tp_engine(checkpoints, kind, tp, enable_lora=True, max_loras=2, max_lora_rank=MAX_RANK)
    check_mixed_batch(llm, kind, checkpoints, loras, seed=120 + tp)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_routed_expert_adapters_in_both_forms_at_tp_equal_hf_peft(tp, checkpoints, adapters, tmp_path):
    """Routed-expert LoRA where the hidden size differs from the experts' intermediate size, as PEFT's
    target_parameters and as per-expert modules, mixed in one batch with the base model."""
    fused = adapters("moe", seed=150, target_modules=None, target_parameters=EXPERT_PARAMETERS)
    original = adapters("moe", seed=151, target_modules=None, target_parameters=EXPERT_PARAMETERS)
    per_expert = per_expert_form("moe", checkpoints("moe"), original, tmp_path / "per-expert")
    loras = [LoRARequest("fused", 1, fused), None, LoRARequest("per-expert", 2, per_expert), LoRARequest("fused", 1, fused)]
    llm = tp_engine(checkpoints, "moe", tp, enable_lora=True, max_loras=2, max_lora_rank=MAX_RANK)
    check_mixed_batch(llm, "moe", checkpoints, loras, seed=160 + tp, references={per_expert: original})


@pytest.mark.parametrize("max_loras", [1, 2, 4])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_by_max_loras_matrix(tp, max_loras, checkpoints, adapters):
    """No adapter and adapters of ranks 1, 6 and 9 mixed in one batch, against per-request HF+PEFT."""
    folders = [adapters("dense", seed=130 + r, r=r) for r in (1, 6, 9)]
    loras = [None, LoRARequest("r1", 1, folders[0]), LoRARequest("r6", 2, folders[1]), None, LoRARequest("r9", 3, folders[2]), LoRARequest("r1", 1, folders[0])]
    llm = tp_engine(checkpoints, "dense", tp, enable_lora=True, max_loras=max_loras, max_lora_rank=9)
    check_mixed_batch(llm, "dense", checkpoints, loras, seed=140)


def test_sizes_that_do_not_split_are_refused_naming_the_dimension(checkpoints):
    with pytest.raises(ShardError, match=r"tensor_parallel_size=3.*units.*sizes that work: 1, 2, 4"):
        tp_engine(checkpoints, "dense", 3)
    # GDN key heads cannot be replicated like KV heads: 8 ranks are refused, naming the block.
    key_heads = TEXT["linear_num_key_heads"]
    with pytest.raises(ShardError, match=rf"linear_attn.*block 'q' has {key_heads} units.*tensor_parallel_size=8"):
        tp_engine(checkpoints, "dense", 8)


class GraphsLeftBehind:
    """Stands in for the driver's decode graphs (the CPU has none). On GPUs NCCL's abort waits until every graph that
    captured its collectives is destroyed, and an engine that lost a worker keeps its driver: the graphs must be
    destroyed while the group still stands, before it is aborted."""

    destroyed_in_group: bool | None = None

    def fits(self, step) -> bool:
        return False

    def destroy(self) -> None:
        self.destroyed_in_group = dist.is_initialized()


def test_a_killed_worker_is_a_clear_error_not_a_hang(checkpoints):
    llm = tp_engine(checkpoints, "dense", 2)
    procs = llm.llm_engine.executor.procs
    llm.llm_engine.executor.driver.graphs = graphs = GraphsLeftBehind()
    os.kill(procs[0].pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerDied, match="rank 1"):
        llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4))
    assert time.monotonic() - start < 30
    assert graphs.destroyed_in_group is True
    with pytest.raises(WorkerDied):  # the engine stays failed rather than half-working
        llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4))
    assert not any(p.is_alive() for p in procs)


def test_an_engine_shut_down_after_losing_a_worker_destroys_the_graphs_it_keeps_before_leaving_the_group(checkpoints):
    """Shut down after the watch found a worker gone, before any step noticed: on a GPU the engine keeps its driver
    (`_keep_after_loss`), and the graphs that driver holds must still be destroyed before NCCL's abort."""
    llm = tp_engine(checkpoints, "dense", 2)
    executor = llm.llm_engine.executor
    procs = list(executor.procs)
    executor.driver.graphs = graphs = GraphsLeftBehind()
    os.kill(procs[0].pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while executor.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert executor.lost is not None
    executor.device = torch.device("cuda")  # what close() does after a loss on a GPU (the watch has seen a CPU engine)
    llm.llm_engine.shutdown()
    assert graphs.destroyed_in_group is True
    assert not any(p.is_alive() for p in procs)


def test_a_worker_lost_between_steps_fails_the_next_call_before_any_collective(checkpoints):
    """The watch notices the exit on its own thread; the next step then raises at once, naming the rank, without
    running a forward (on GPUs that forward's collectives would wait for the dead peer)."""
    llm = tp_engine(checkpoints, "dense", 2)
    executor = llm.llm_engine.executor
    os.kill(executor.procs[0].pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while executor.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert executor.lost is not None and executor.lost[0] == 1
    forwards = []
    driver_execute = executor.driver.execute
    executor.driver.execute = lambda step: forwards.append(step) or driver_execute(step)
    with pytest.raises(WorkerDied, match="rank 1"):
        llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4))
    assert forwards == []


def test_shutdown_leaves_no_process(checkpoints):
    llm = tp_engine(checkpoints, "moe", 2)
    procs = list(llm.llm_engine.executor.procs)
    assert all(p.is_alive() for p in procs)
    llm.llm_engine.shutdown()
    assert not any(p.is_alive() for p in procs)


DRIVER = """
import sys, time
from hylo import LLM

if __name__ == "__main__":
    llm = LLM(sys.argv[1], device="cpu", dtype="float32", progress=False, tensor_parallel_size=2, kv_cache_memory_bytes=1 << 26)
    print(llm.llm_engine.executor.procs[0].pid, flush=True)
    time.sleep(300)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.split()[:2] == ["State:", "Z"] for line in f)  # exited, not yet reaped by its new parent
    except FileNotFoundError:
        return True


def test_workers_exit_when_their_driver_is_killed(checkpoints, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH")]))}
    driver = subprocess.Popen([sys.executable, str(script), checkpoints("dense")], stdout=subprocess.PIPE, text=True, env=env)
    worker = None
    try:
        worker = int(driver.stdout.readline())
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + 20
        while not _gone(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(worker), "the worker outlived its driver"
    finally:
        driver.kill()
        if worker is not None and not _gone(worker):
            os.kill(worker, signal.SIGKILL)

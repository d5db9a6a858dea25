"""An eager step's forward never makes the host wait for the GPU (marked `gpu`, skipped elsewhere).

A wait (a blocking copy, `.item()`, `.tolist()` of a device tensor) inside a layer empties the GPU's queue: the GPU
then idles while the host launches the next layer, and at TP>1 the wait also covers the other ranks' all-reduces, so
the ranks' launches run one after another. A 27B prefill at TP=2 took 3.7× its TP=1 time that way (fla building its
chunk indices on the host in every GDN layer). torch's sync debug mode reports such waits (blocking copies, reads of
device values; not `torch.cuda.synchronize()` or collectives)."""

import importlib.util
import traceback
import warnings

import pytest
import torch

from hylo import LLM, LoRARequest, SamplingParams
from tests.conftest import MAX_RANK, random_prompts

# Without fla-core the prefill takes the torch reference, which reads the sequence bounds back on purpose.
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("fla") is None, reason="needs CUDA and fla-core"),
]


def record_host_waits(worker) -> list[str]:
    """From now on, each wait inside a forward of `worker`: torch's warning and the Python stack that waited."""
    forward, waits = worker._forward, []

    def show(message, *_args, **_kwargs):
        waits.append(f"{message}\n{''.join(traceback.format_stack(limit=14)[:-2])}")

    def checked(step, tokens=None):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = show
                return forward(step, tokens)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    worker._forward = checked
    return waits


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("eager", [True, False], ids=["eager decode", "graphs"])
def test_no_forward_waits_for_the_gpu(kind, eager, checkpoints, adapters):
    """Prefills of several 64-token chunks, one prompt prefilled in pieces (its later pieces attend to its cache),
    decode rows beside them, two adapters and the base model in one step."""
    llm = LLM(checkpoints(kind), device="cuda", dtype="bfloat16", progress=False, kv_cache_memory_bytes=1 << 28, enforce_eager=eager,
              enable_lora=True, max_loras=2, max_lora_rank=MAX_RANK, max_num_batched_tokens=160)
    try:
        prompts = [{"prompt_token_ids": p} for p in random_prompts([150, 9, 70, 1], seed=400)]
        loras = [LoRARequest("w1", 41, adapters(kind, seed=401)), None, LoRARequest("w2", 42, adapters(kind, seed=402)), None]
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        first = llm.generate(prompts, params, lora_request=loras)  # compiles and tunes every kernel (which waits)
        waits = record_host_waits(llm.llm_engine.executor.driver)
        again = llm.generate(prompts, params, lora_request=loras)
    finally:
        llm.shutdown()
    sites = list(dict.fromkeys(waits))
    assert not sites, f"{len(waits)} waits at {len(sites)} places:\n" + "\n".join(sites)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in first]

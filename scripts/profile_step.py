"""Where a step's time goes on the GPU: the top kernels, and GPU busy time vs wall time.

python scripts/profile_step.py [shape] [batch] [adapters] [decode|prefill] [tensor_parallel_size]
(random weights, as `hylo bench`; at tensor_parallel_size > 1 the profile is rank 0's, which runs in this process)

decode: 20 decode steps of `batch` sequences with 128-token prompts; prefill: one step prefilling `batch`
prompts of 1024 tokens, as `hylo bench`'s prefill figure.
"""

import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from hylo import LLM, LoRARequest, SamplingParams
from hylo.bench import write_adapter, write_config


def main(shape: str = "qwen3.5-9b", batch: int = 1, adapters: int = 1, mode: str = "decode", tp: int = 1) -> None:
    prompt_len, steps = (1024, 1) if mode == "prefill" else (128, 20)
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(str(write_config(shape, Path(tmp) / "m")), dtype="bfloat16", device="cuda", load_format="dummy", enable_lora=adapters > 0,
                  max_loras=max(1, adapters), max_num_seqs=max(batch, 1), max_model_len=2048, max_num_batched_tokens=max(8192, batch * prompt_len),
                  progress=False, tensor_parallel_size=tp)
        engine = llm.llm_engine
        loras = []
        for i in range(adapters):
            write_adapter(engine.model, engine.model_config, Path(tmp) / f"a{i}", 16, seed=i)
            loras.append(LoRARequest(f"a{i}", i + 1, str(Path(tmp) / f"a{i}")))
        prompts = [{"prompt_token_ids": list(range(100, 100 + prompt_len))} for _ in range(batch)]
        requests = [loras[i % len(loras)] for i in range(batch)] if loras else None
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), lora_request=requests)  # compiles
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True), requests[i] if requests else None)
        if mode == "decode":
            for _ in range(8):
                engine.step()  # prefill and the first decode steps, outside the profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / steps
        engine.shutdown()
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / steps / 1e3
        print(f"{shape} TP={tp} {mode} batch {batch}, {adapters} adapters: wall {wall * 1e3:.2f} ms/step, GPU busy {gpu:.2f} ms/step")
        print(events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=60))


if __name__ == "__main__":
    args = sys.argv[1:]
    main(*(args[:1] or ["qwen3.5-9b"]), *(int(a) for a in args[1:3]), *args[3:4], *(int(a) for a in args[4:5]))

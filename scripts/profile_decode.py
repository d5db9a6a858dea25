"""Where a decode step's time goes on the GPU: the top kernels of a few steps, and GPU busy time vs wall time.

python scripts/profile_decode.py [shape] [batch] [adapters]   (random weights, as `hylo bench`)
"""

import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from hylo import LLM, LoRARequest, SamplingParams
from hylo.bench import write_adapter, write_config


def main(shape: str = "qwen3.5-9b", batch: int = 1, adapters: int = 1) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(str(write_config(shape, Path(tmp) / "m")), dtype="bfloat16", device="cuda", load_format="dummy", enable_lora=adapters > 0,
                  max_loras=max(1, adapters), max_num_seqs=max(batch, 1), max_model_len=1024, progress=False)
        engine = llm.llm_engine
        loras = []
        for i in range(adapters):
            write_adapter(engine.model, engine.model_config, Path(tmp) / f"a{i}", 16, seed=i)
            loras.append(LoRARequest(f"a{i}", i + 1, str(Path(tmp) / f"a{i}")))
        prompts = [{"prompt_token_ids": list(range(100, 228))} for _ in range(batch)]
        requests = [loras[i % len(loras)] for i in range(batch)] if loras else None
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), lora_request=requests)
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True), requests[i] if requests else None)
        for _ in range(8):
            engine.step()  # prefill and the first decode steps, outside the profile
        torch.cuda.synchronize()
        steps = 20
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / steps
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / steps / 1e3
        print(f"{shape} batch {batch}, {adapters} adapters: wall {wall * 1e3:.2f} ms/step, GPU busy {gpu:.2f} ms/step")
        print(events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "qwen3.5-9b", *(int(a) for a in sys.argv[2:]))

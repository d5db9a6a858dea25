"""`hylo bench`: decode and prefill speed on a named shape with random weights, as ratios measured in one run.

In the same process it measures the device's copy bandwidth and bf16 matmul rate (the two ceilings),
then hylo's decode step (the anchor method: 128-token prompts, 128 new tokens, greedy, ignore EOS,
whole-call time / 128) at each batch size and adapter count, prefill throughput, and optionally
HF transformers + PEFT on the same shape.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    "qwen3.5-9b": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", {}),
    # Qwen3.5-27B's text model (its published config): the dense model people split over two GPUs.
    "qwen3.5-27b": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(
        vocab_size=248320, hidden_size=5120, intermediate_size=17408, num_hidden_layers=64, num_attention_heads=24,
        num_key_value_heads=4, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=48,
        linear_key_head_dim=128, linear_value_head_dim=128)),
    "qwen3.5-35b-a3b": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", {}),
    # The same layers, half as many (20 of 40): per-layer ratios as the full shape, on an 80 GB GPU.
    "qwen3.5-35b-a3b-20l": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", {"num_hidden_layers": 20}),
    "tiny": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(
        vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8,
        linear_key_head_dim=32, linear_value_head_dim=32)),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj", "gate_proj", "up_proj", "down_proj"]


def write_config(shape: str, folder: Path) -> Path:
    import transformers as tf

    config_name, arch, overrides = SHAPES[shape]
    config = getattr(tf, config_name)(**overrides, max_position_embeddings=4096)
    config.architectures = [arch]
    config.save_pretrained(folder)
    return folder


def write_adapter(model, model_config, folder: Path, rank: int, seed: int) -> None:
    """A random rank-`rank` PEFT adapter on every text target of the model (each routed expert included), as PEFT
    would name it."""
    from hylo.lora.adapter import lora_targets

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, target in lora_targets(model).items():
        # Routed experts as PEFT's per-expert modules; only the 12 target names (PEFT would refuse the rest).
        if target.part.lora not in ("module", "expert") or name.rpartition(".")[2] not in TARGETS:
            continue
        out_features, in_features = target.part.full_shape()[:2]
        peft = "base_model.model." + model_config.checkpoint_prefix + name[len("model."):]
        tensors[peft + ".lora_A.weight"] = (torch.randn(rank, in_features, generator=g) / in_features**0.5).bfloat16()
        tensors[peft + ".lora_B.weight"] = (torch.randn(out_features, rank, generator=g) * 0.01).bfloat16()
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": TARGETS}))


def ceilings(device: torch.device) -> dict:
    """Copy bandwidth (bytes read + written per second) and the bf16 matmul rate, each the median of several runs."""
    def timed(fn, repeat=10) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    src = torch.randn(512 * 2**20, device=device, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 2 / timed(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    flops = 2 * 8192**3 / timed(lambda: a @ b)
    return {"copy_bytes_per_s": bandwidth, "bf16_flops_per_s": flops}


def graph_us(fn, calls: int = 20, replays: int = 10) -> float:
    """GPU time of one call of `fn` in µs: `calls` calls captured in one CUDA graph, so that host launch costs drop
    out, as they do inside a captured decode step."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (replays * calls) * 1e6


def weight_bytes(model, model_config) -> tuple[int, int, int]:
    """This rank's (all weight bytes, bytes read per decode token: routed experts count only top_k of them,
    bytes of the routed experts)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    text = model_config.text
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    active = total - experts + (experts * text.num_experts_per_tok // text.num_experts if model_config.is_moe else 0)
    return total, active, experts


def touched_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected number of distinct experts a decode step of `tokens` tokens reads, each token picking `top_k`
    distinct experts of `num_experts` uniformly: an expert is missed by one token with probability 1 - k/E."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def step_bytes(total: int, experts: int, model_config, batch: int) -> float:
    """Bytes one decode step of `batch` sequences reads: every weight but the routed experts, and of those the
    share a step of this size touches (top_k of them at batch 1, nearly all at large batches)."""
    if not model_config.is_moe:
        return total
    text = model_config.text
    return total - experts + experts * touched_experts(text.num_experts, text.num_experts_per_tok, batch) / text.num_experts


def decode_ms(llm, batch: int, loras: list, prompt_len: int, new_tokens: int) -> float:
    from hylo import SamplingParams

    g = torch.Generator().manual_seed(batch)
    vocab = llm.llm_engine.model_config.text.vocab_size
    prompts = [{"prompt_token_ids": torch.randint(0, vocab, (prompt_len,), generator=g).tolist()} for _ in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    requests = [loras[i % len(loras)] for i in range(batch)] if loras else None
    start = time.perf_counter()
    llm.generate(prompts, params, lora_request=requests)
    return 1e3 * (time.perf_counter() - start) / new_tokens


def decode_step_ms(llm, batch: int, prompt_len: int, steps: int = 32) -> float:
    """Wall time of one engine step once every sequence is decoding (prefill excluded): what a step costs the host
    and the GPU together, without the anchor method's share of prefill."""
    from hylo import SamplingParams

    engine = llm.llm_engine
    vocab = engine.model_config.text.vocab_size
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        engine.add_request(f"bench-step-{i}", {"prompt_token_ids": torch.randint(0, vocab, (prompt_len,), generator=g).tolist()}, params)
    while any(not r.sequences[0].output_ids for r in engine.requests.values()):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    seconds = time.perf_counter() - start  # each step ends reading its sampled tokens: the GPU is done
    while engine.has_unfinished_requests():
        engine.step()
    return 1e3 * seconds / steps


def random_hf_model(folder: Path):
    """HF transformers' model for the config in `folder`, with random bf16 weights made on the GPU (billions of
    parameters take minutes to initialise on the host)."""
    import transformers as tf

    with torch.device("cuda"):
        return tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(folder), dtype=torch.bfloat16)


def write_checkpoint(shape: str, folder: Path) -> Path:
    """A random bf16 checkpoint of `shape` in HF's safetensors layout, as `save_pretrained` writes it."""
    model = random_hf_model(write_config(shape, folder))
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def run(shape: str, batches: list[int], adapters: list[int], rank: int, prompt_len: int, new_tokens: int, prefill_tokens: int,
        hf: bool, out: Path | None, tensor_parallel_size: int = 1, checkpoint: Path | None = None) -> dict:
    """One engine's figures. `checkpoint`: load this folder from disk (start-up then includes reading it); without
    it, random weights are made in place (load_format="dummy")."""
    from hylo import LLM, LoRARequest

    device = torch.device("cuda")
    result = {"shape": shape, "tensor_parallel_size": tensor_parallel_size, "gpu": torch.cuda.get_device_name(device), "date": time.strftime("%Y-%m-%d"), "method":
              f"{prompt_len}-token prompts, {new_tokens} new tokens, greedy, ignore EOS; ms/step = whole generate() / {new_tokens}",
              "weights": "read from safetensors on disk" if checkpoint else "random, made in place"}
    result.update(ceilings(device))
    torch.cuda.empty_cache()  # the ceilings' buffers are gone; give their memory to the engine
    with tempfile.TemporaryDirectory() as tmp:
        folder = checkpoint or write_config(shape, Path(tmp) / "model")
        start = time.perf_counter()
        llm = LLM(str(folder), dtype="bfloat16", device="cuda", load_format="safetensors" if checkpoint else "dummy", enable_lora=max(adapters) > 0,
                  max_loras=max(1, max(adapters)), max_lora_rank=rank, max_num_batched_tokens=max(prefill_tokens, prompt_len * max(batches)),
                  max_model_len=max(prompt_len + new_tokens, 1024) + 8, max_num_seqs=max(batches + [prefill_tokens // 1024]),
                  tensor_parallel_size=tensor_parallel_size)
        result["startup_s"] = time.perf_counter() - start
        engine = llm.llm_engine
        if engine.executor.driver.graphs is not None:  # no local name for it: it must not outlive the engine below
            result.update(graph_capture_s=engine.executor.driver.graphs.capture_s, graph_memory_bytes=engine.executor.driver.graphs.memory_bytes)
        total, active, experts = weight_bytes(engine.model, engine.model_config)
        result.update(weight_bytes=total, active_weight_bytes=active, roofline_ms=1e3 * active / result["copy_bytes_per_s"])
        result["roofline_ms_by_batch"] = {b: 1e3 * step_bytes(total, experts, engine.model_config, b) / result["copy_bytes_per_s"] for b in batches}
        loras = []
        for i in range(max(adapters)):
            write_adapter(engine.model, engine.model_config, Path(tmp) / f"a{i}", rank, seed=i)
            loras.append(LoRARequest(f"a{i}", i + 1, str(Path(tmp) / f"a{i}")))
        for b in batches:  # warm-up: every prefill and decode shape compiled and tuned, adapters read and in slots
            decode_ms(llm, b, loras, prompt_len, 2)
        rows = []
        for n in adapters:
            for b in batches:
                ms = decode_ms(llm, b, loras[:n], prompt_len, new_tokens)
                rows.append({"batch": b, "adapters": n, "ms_per_step": ms, "tokens_per_s": 1e3 * b / ms})
                print(f"  batch {b:4d}, adapters {n}: {ms:8.2f} ms/step, {1e3 * b / ms:9.1f} tok/s", flush=True)
        # The host's part of a decode step: a step's wall time beyond its captured GPU work.
        result["decode_step"] = {b: {"step_ms": decode_step_ms(llm, b, prompt_len), "graph_ms": engine.executor.call("graph_replay_ms", b, 50)[0]}
                                 for b in batches}
        for step in result["decode_step"].values():
            step["host_ms"] = step["step_ms"] - step["graph_ms"] if step["graph_ms"] is not None else None
        base = {r["batch"]: r["ms_per_step"] for r in rows if r["adapters"] == 0}
        for r in rows:
            r["vs_base"] = r["ms_per_step"] / base[r["batch"]] if r["batch"] in base else None
            r["vs_roofline"] = r["ms_per_step"] / result["roofline_ms_by_batch"][r["batch"]]
        result["decode"] = rows
        if 4 in adapters:
            result["cold"] = cold_adapter_rows(llm, Path(tmp), batches, loras, rank, prompt_len, new_tokens, rows)
        if loras:
            result["adapter_swap"] = swap_ms(engine, loras[0].lora_int_id)
        n_prompts = max(1, prefill_tokens // 1024)
        decode_ms(llm, n_prompts, loras[:1], 1024, 1)  # warm-up: the prefill kernels compile for these shapes
        start = time.perf_counter()
        decode_ms(llm, n_prompts, loras[:1], 1024, 1)
        seconds = time.perf_counter() - start
        result["prefill"] = {"tokens": n_prompts * 1024, "tokens_per_s": n_prompts * 1024 / seconds,
                             "matmul_fraction": 2 * (active // 2) * n_prompts * 1024 / seconds / result["bf16_flops_per_s"]}
        engine.shutdown()
        del llm, engine
        gc.collect()  # the model's modules refer to each other (shared LoRA batch, tied weights): free them now
        torch.cuda.empty_cache()
        if hf:
            result["hf_peft"] = hf_peft_ms(folder, loras[:1], prompt_len, new_tokens)
    if out:
        out.write_text(json.dumps(result, indent=2))
    return result


def cold_adapter_rows(llm, tmp: Path, batches: list[int], loras: list, rank: int, prompt_len: int, new_tokens: int, warm: list[dict]) -> list[dict]:
    """Batches mixing 4 adapters, 3 of them never seen before: their files are read and written into slots inside
    the timed call, while the requests of the warm one decode. Compared with the same batch with 4 warm adapters."""
    from hylo import LoRARequest

    engine = llm.llm_engine
    rows = []
    for b in (b for b in batches if b >= 4):  # a smaller batch would not use all four adapters
        cold = []
        for i in range(3):
            lora_id = 1000 + 10 * b + i  # ids never used before: nothing of them is in memory
            write_adapter(engine.model, engine.model_config, tmp / f"cold{lora_id}", rank, seed=lora_id)
            cold.append(LoRARequest(f"cold{lora_id}", lora_id, str(tmp / f"cold{lora_id}")))
        ms = decode_ms(llm, b, [loras[0], *cold], prompt_len, new_tokens)
        base = next(r["ms_per_step"] for r in warm if r["batch"] == b and r["adapters"] == 4)
        rows.append({"batch": b, "adapters": 4, "cold": 3, "ms_per_step": ms, "vs_warm": ms / base})
        print(f"  batch {b:4d}, 4 adapters, 3 of them cold: {ms:8.2f} ms/step, {ms / base:.2f}× warm", flush=True)
    return rows


def swap_ms(engine, lora_id: int) -> dict:
    """Writing a registered adapter (pinned host memory) into device slot 0, where the warm-up already put it: the
    host's time to queue the copies (what a step waits for) and the time until the copies are done."""
    driver = engine.executor.driver
    slot = engine.lora.slot_lora.index(lora_id)
    torch.cuda.synchronize()
    start = time.perf_counter()
    driver.lora_load(slot, lora_id)
    queued = time.perf_counter() - start
    torch.cuda.synchronize()
    done = time.perf_counter() - start
    size = sum(t.numel() * t.element_size() for tensors in driver.lora.images[lora_id].values() for t in tensors)
    return {"queue_ms": 1e3 * queued, "copy_done_ms": 1e3 * done, "bytes": size}


def hf_peft_ms(folder: Path, loras: list, prompt_len: int, new_tokens: int) -> dict:
    """HF transformers (+ PEFT for the adapter row) on the same shape, batch 1, the same method."""
    model = random_hf_model(folder).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device="cuda")

    def ms(m) -> float:
        m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - start) / new_tokens

    out = {"batch1_base_ms": ms(model)}
    if loras:
        from peft import PeftModel

        out["batch1_adapter_ms"] = ms(PeftModel.from_pretrained(model, loras[0].lora_path).eval())
    return out


def print_scaling(runs: list[dict]) -> None:
    """Each run's ms/step against the first run's (the smallest tensor-parallel size), same batch and adapters."""
    first = {(row["batch"], row["adapters"]): row["ms_per_step"] for row in runs[0]["decode"]}
    sizes = [r["tensor_parallel_size"] for r in runs]
    print(f"\nms/step by tensor_parallel_size ({', '.join(map(str, sizes))}), and speed-up over TP={sizes[0]}")
    columns = ["batch", "adapters", *(f"TP={n}" for n in sizes), "speed-up"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in runs[-1]["decode"]:
        key = (row["batch"], row["adapters"])
        times = [next(x["ms_per_step"] for x in r["decode"] if (x["batch"], x["adapters"]) == key) for r in runs]
        print(f"| {key[0]} | {key[1]} | " + " | ".join(f"{t:.2f}" for t in times) + f" | {first[key] / times[-1]:.2f}× |")


def print_table(r: dict) -> None:
    print(f"\n{r['shape']} on {r['gpu']} × {r['tensor_parallel_size']} ({r['date']}); {r['method']}")
    print(f"copy {r['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul {r['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s, "
          f"weights {r['weight_bytes'] / 1e9:.1f} GB (read per token {r['active_weight_bytes'] / 1e9:.1f} GB), "
          f"roofline {r['roofline_ms']:.2f} ms/step, start-up {r['startup_s']:.1f} s (weights {r['weights']})")
    if len(set(r["roofline_ms_by_batch"].values())) > 1:
        print("roofline by batch (the routed experts a step touches): " + ", ".join(f"{b}: {ms:.2f} ms" for b, ms in r["roofline_ms_by_batch"].items()))
    if "graph_memory_bytes" in r:
        print(f"decode CUDA graphs: captured in {r['graph_capture_s']:.1f} s, {r['graph_memory_bytes'] / 2**30:.2f} GiB")
    print("| batch | adapters | ms/step | tok/s | × own base | × roofline |\n|---|---|---|---|---|---|")
    for row in r["decode"]:
        vs_base = f"{row['vs_base']:.2f}" if row["vs_base"] else "–"
        print(f"| {row['batch']} | {row['adapters']} | {row['ms_per_step']:.2f} | {row['tokens_per_s']:.0f} | {vs_base} | {row['vs_roofline']:.2f} |")
    for batch, step in r["decode_step"].items():
        graph = f", its captured GPU work {step['graph_ms']:.2f} ms, the host's part {step['host_ms']:.2f} ms" if step["graph_ms"] else ""
        print(f"decode step alone, batch {batch}: {step['step_ms']:.2f} ms{graph}")
    for row in r.get("cold", []):
        print(f"batch {row['batch']}, 4 adapters of which 3 cold (read from disk inside the timed call): {row['ms_per_step']:.2f} ms/step = {row['vs_warm']:.2f}× warm")
    if "adapter_swap" in r:
        w = r["adapter_swap"]
        print(f"adapter swap ({w['bytes'] / 2**20:.0f} MiB): queued in {w['queue_ms']:.2f} ms, copied in {w['copy_done_ms']:.2f} ms")
    p = r["prefill"]
    print(f"prefill, {p['tokens']} tokens with an adapter: {p['tokens_per_s']:.0f} tok/s = {100 * p['matmul_fraction']:.0f}% of the bf16 matmul rate")
    if "hf_peft" in r:
        print("HF+PEFT batch 1: " + ", ".join(f"{k} {v:.1f}" for k, v in r["hf_peft"].items()))

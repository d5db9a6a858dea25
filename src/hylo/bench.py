"""`hylo bench`: decode and prefill speed on a named shape with random weights, as ratios measured in one run.

In the same process it measures the device's copy bandwidth and bf16 matmul rate (the two ceilings),
then hylo's decode step (the anchor method: 128-token prompts, 128 new tokens, greedy, ignore EOS,
whole-call time / 128) at each batch size and adapter count, prefill throughput, optionally long-context
prefill and decode (`measure_long_context`), and optionally HF transformers + PEFT on the same shape.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from hylo.batch import GDN_CHUNK

SHAPES = {
    "qwen3.5-9b": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", {}),
    # Qwen3.5-27B's text model (its published config): the dense model people split over two GPUs.
    "qwen3.5-27b": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(
        vocab_size=248320, hidden_size=5120, intermediate_size=17408, num_hidden_layers=64, num_attention_heads=24,
        num_key_value_heads=4, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=48,
        linear_key_head_dim=128, linear_value_head_dim=128)),
    "qwen3.5-35b-a3b": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", {}),
    # Qwen3.5-122B-A10B's text model (its published config): ~244 GB in bf16, for TP=4 and 8.
    "qwen3.5-122b-a10b": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", dict(
        vocab_size=248320, hidden_size=3072, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=2, head_dim=256,
        linear_num_key_heads=16, linear_num_value_heads=64, linear_key_head_dim=128, linear_value_head_dim=128,
        num_experts=256, num_experts_per_tok=8, moe_intermediate_size=1024, shared_expert_intermediate_size=1024)),
    # The same layers, half as many (20 of 40): per-layer ratios as the full shape, on an 80 GB GPU.
    "qwen3.5-35b-a3b-20l": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", {"num_hidden_layers": 20}),
    "tiny": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(
        vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8,
        linear_key_head_dim=32, linear_value_head_dim=32)),
}
DECODE_STEPS = 32  # engine steps decode_step_ms times
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

    # Made on the model's device: a MoE's per-expert tensors (about 60 000 at 35B-A3B) took the host about 12 s per adapter.
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for name, target in lora_targets(model).items():
        # Routed experts as PEFT's per-expert modules; only the 12 target names (PEFT would refuse the rest).
        if target.part.lora not in ("module", "expert") or name.rpartition(".")[2] not in TARGETS:
            continue
        out_features, in_features = target.part.full_shape()[:2]
        peft = "base_model.model." + model_config.checkpoint_prefix + name[len("model."):]
        tensors[peft + ".lora_A.weight"] = (torch.randn(rank, in_features, generator=g, device=device) / in_features**0.5).bfloat16().cpu()
        tensors[peft + ".lora_B.weight"] = (torch.randn(out_features, rank, generator=g, device=device) * 0.01).bfloat16().cpu()
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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_new_tokens(batch: int, prompt_len: int, max_num_batched_tokens: int, steps: int = DECODE_STEPS) -> int:
    """New tokens each request of decode_step_ms asks for. Prompts longer than one step's token budget are
    prefilled in chunks over several steps, and a sequence whose prompt is done decodes a token in each of them
    (taking one token of the budget): none may finish before the timed steps end."""
    prefill_steps = -(-batch * prompt_len // max(1, max_num_batched_tokens - batch + 1))
    return prefill_steps + steps + 8


def decode_step_ms(llm, batch: int, prompt_len: int, steps: int = DECODE_STEPS) -> float:
    """Wall time of one engine step once every sequence is decoding (prefill excluded): what a step costs the host
    and the GPU together, without the anchor method's share of prefill."""
    from hylo import SamplingParams

    engine = llm.llm_engine
    vocab = engine.model_config.text.vocab_size
    new_tokens = step_new_tokens(batch, prompt_len, engine.config.max_num_batched_tokens, steps)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        engine.add_request(f"bench-step-{i}", {"prompt_token_ids": torch.randint(0, vocab, (prompt_len,), generator=g).tolist()}, params)
    while any(not r.sequences[0].output_ids for r in engine.requests.values()):
        engine.step()
    synchronize(engine.device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    synchronize(engine.device)  # with async scheduling the last step's GPU work may still be running
    seconds = time.perf_counter() - start
    while engine.has_unfinished_requests():
        engine.step()
    return 1e3 * seconds / steps


def prefill_flops(text, tokens: int, active_params: int, tensor_parallel_size: int = 1) -> dict[str, int]:
    """FLOPs of prefilling one `tokens`-token prompt on one rank, by part (a multiply-add counts 2):
    - weights: 2 × this rank's active params (all, as the short prefill figure counts them) × tokens;
    - attention: per full-attention layer QKᵀ and PV, 2 × 2 × query heads × head_dim per query-key pair, over the
      tokens·(tokens+1)/2 pairs a causal mask keeps (chunked prefill computes the same pairs);
    - gdn: per GDN layer, token and value head, the chunked gated delta rule's matmuls: 3 with the [dk, dv] state
      (keys read it, queries read it, the update), 6·dk·dv, and 5 within a 64-token chunk (K·Kᵀ, Q·Kᵀ, the
      triangular system applied to K and to V, the masked scores times V), 2·C·(3·dk + 2·dv), counted as full tiles."""
    layers = list(text.layer_types)
    heads = text.num_attention_heads // tensor_parallel_size
    attention = layers.count("full_attention") * 2 * 2 * heads * text.head_dim * (tokens * (tokens + 1) // 2)
    dk, dv = text.linear_key_head_dim, text.linear_value_head_dim
    value_heads = text.linear_num_value_heads // tensor_parallel_size
    gdn = layers.count("linear_attention") * value_heads * tokens * (6 * dk * dv + 2 * GDN_CHUNK * (3 * dk + 2 * dv))
    return {"weights": 2 * active_params * tokens, "attention": attention, "gdn": gdn}


def decode_shortfall(plan, block_size: int, max_model_len: int, batch: int, tokens: int) -> str | None:
    """Why `batch` sequences of `tokens` tokens each cannot all stay in the cache at once (then the scheduler would
    preempt and recompute some inside the timed steps), or None when they can."""
    if batch > plan.num_slots:
        return f"{batch} sequences need {batch} GDN state slots, the cache has {plan.num_slots}"
    if tokens > max_model_len:
        return f"a sequence needs {tokens} tokens, above max_model_len={max_model_len}"
    blocks = batch * -(-tokens // block_size)
    if blocks > plan.num_blocks:
        return (f"{batch} × {tokens} tokens need {blocks} KV blocks of {block_size} tokens, the cache has {plan.num_blocks} "
                f"(room for {plan.num_blocks * block_size} tokens)")
    return None


def measure_long_context(llm, context: int, batches: list[int], short_context: int, short_step_ms: dict[int, float],
                         flops_per_s: float) -> dict:
    """Prefill of one `context`-token prompt against the matmul rate, and a decode step of each batch whose sequences
    hold `context` tokens against the same batch's step at `short_context` tokens (`short_step_ms`, measured by
    decode_step_ms on the same engine). Base model, no adapter. A batch the cache cannot hold is skipped, with why."""
    engine = llm.llm_engine
    decode_ms(llm, 1, [], context, 1)  # warm-up: the prefill kernels compile and tune for chunks that read a long history
    # max_tokens=1: the whole generate() is the prompt's prefill and its first token, as the short prefill figure.
    seconds = decode_ms(llm, 1, [], context, 1) / 1e3
    _, active, _ = weight_bytes(engine.model, engine.model_config)
    flops = prefill_flops(engine.model_config.text, context, active // engine.dtype.itemsize, engine.config.tensor_parallel_size)
    prefill = {"tokens": context, "seconds": seconds, "tokens_per_s": context / seconds, "flops": flops,
               "matmul_fraction": sum(flops.values()) / seconds / flops_per_s}
    print(f"  long context {context}: prefill {seconds:.2f} s, {context / seconds:.0f} tok/s", flush=True)
    rows = []
    for b in batches:
        # decode_step_ms times steps only once every prompt is prefilled, so each step is `b` one-token decodes.
        tokens = context + step_new_tokens(b, context, engine.config.max_num_batched_tokens)
        why = decode_shortfall(engine.executor.plan, engine.config.block_size, engine.max_model_len, b, tokens)
        if why:
            rows.append({"batch": b, "skipped": why})
            print(f"  long context {context}, batch {b}: skipped: {why}", flush=True)
            continue
        ms = decode_step_ms(llm, b, context)
        rows.append({"batch": b, "step_ms": ms, "tokens_per_s": 1e3 * b / ms, "vs_short_context": ms / short_step_ms[b]})
        print(f"  long context {context}, batch {b}: {ms:8.2f} ms/step, {ms / short_step_ms[b]:.2f}× at {short_context} tokens", flush=True)
    return {"context": context, "short_context": short_context, "method":
            f"prefill: one {context}-token prompt, max_tokens=1, whole generate(); FLOPs = 2 × active params × tokens + causal "
            f"attention (QKᵀ, PV) + GDN chunked matmuls (chunk {GDN_CHUNK}); decode: engine steps once every prompt of the "
            f"batch is prefilled (decode_step_ms), against the same batch's step at {short_context}-token prompts",
            "prefill": prefill, "decode": rows}


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
        hf: bool, out: Path | None, tensor_parallel_size: int = 1, checkpoint: Path | None = None, long_context: int | None = None) -> dict:
    """One engine's figures. `checkpoint`: load this folder from disk (start-up then includes reading it); without
    it, random weights are made in place (load_format="dummy"). `long_context`: also measure_long_context at that
    many tokens (max_model_len then holds them; the other settings are unchanged)."""
    from hylo import LLM, LoRARequest

    device = torch.device("cuda")
    result = {"shape": shape, "tensor_parallel_size": tensor_parallel_size, "gpu": torch.cuda.get_device_name(device), "date": time.strftime("%Y-%m-%d"), "method":
              f"{prompt_len}-token prompts, {new_tokens} new tokens, greedy, ignore EOS; ms/step = whole generate() / {new_tokens}",
              "weights": "read from safetensors on disk" if checkpoint else "random, made in place"}
    result.update(ceilings(device))
    torch.cuda.empty_cache()  # the ceilings' buffers are gone; give their memory to the engine
    with tempfile.TemporaryDirectory() as tmp:
        folder = checkpoint or write_config(shape, Path(tmp) / "model")
        max_batched = max(prefill_tokens, prompt_len * max(batches))
        long_len = long_context + step_new_tokens(max(batches), long_context, max_batched) if long_context else 0
        start = time.perf_counter()
        llm = LLM(str(folder), dtype="bfloat16", device="cuda", load_format="safetensors" if checkpoint else "dummy", enable_lora=max(adapters) > 0,
                  max_loras=max(1, max(adapters)), max_lora_rank=rank, max_num_batched_tokens=max_batched,
                  max_model_len=max(prompt_len + new_tokens, 1024, long_len) + 8, max_num_seqs=max(batches + [prefill_tokens // 1024]),
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
        if engine.async_scheduling:  # the same steps with each step's tokens read back before the next is scheduled
            engine.async_scheduling = False
            for b in batches:
                result["decode_step"][b]["sync_step_ms"] = decode_step_ms(llm, b, prompt_len)
            engine.async_scheduling = True
        for b, step in result["decode_step"].items():
            step["host_ms"] = step["step_ms"] - step["graph_ms"] if step["graph_ms"] is not None else None
            # What a row's generate() spends besides its decode steps, mostly this prefill (max_tokens=1: the whole call).
            step["prefill_ms"] = decode_ms(llm, b, [], prompt_len, 1)
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
        result["prefill"] = {"tokens": n_prompts * 1024, "adapter": bool(loras), "tokens_per_s": n_prompts * 1024 / seconds,
                             "matmul_fraction": 2 * (active // 2) * n_prompts * 1024 / seconds / result["bf16_flops_per_s"]}
        if long_context:
            short_step_ms = {b: step["step_ms"] for b, step in result["decode_step"].items()}
            result["long_context"] = measure_long_context(llm, long_context, batches, prompt_len, short_step_ms, result["bf16_flops_per_s"])
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
        sync = f"; with each step's tokens read back before the next: {step['sync_step_ms']:.2f} ms" if "sync_step_ms" in step else ""
        print(f"decode step alone, batch {batch}: {step['step_ms']:.2f} ms{graph}{sync}; the batch's prompts prefilled "
              f"(generate() with max_tokens=1): {step['prefill_ms']:.1f} ms")
    for row in r.get("cold", []):
        print(f"batch {row['batch']}, 4 adapters of which 3 cold (read from disk inside the timed call): {row['ms_per_step']:.2f} ms/step = {row['vs_warm']:.2f}× warm")
    if "adapter_swap" in r:
        w = r["adapter_swap"]
        print(f"adapter swap ({w['bytes'] / 2**20:.0f} MiB): queued in {w['queue_ms']:.2f} ms, copied in {w['copy_done_ms']:.2f} ms")
    p = r["prefill"]
    print(f"prefill, {p['tokens']} tokens {'with an adapter' if p['adapter'] else 'of the base model'}: {p['tokens_per_s']:.0f} tok/s = {100 * p['matmul_fraction']:.0f}% of the bf16 matmul rate")
    if "long_context" in r:
        print_long_context(r["long_context"])
    if "hf_peft" in r:
        print("HF+PEFT batch 1: " + ", ".join(f"{k} {v:.1f}" for k, v in r["hf_peft"].items()))


def print_long_context(lc: dict) -> None:
    p, f = lc["prefill"], lc["prefill"]["flops"]
    print(f"long context, {lc['context']} tokens (base model, no adapter): prefill of one prompt {p['seconds']:.2f} s, "
          f"{p['tokens_per_s']:.0f} tok/s = {100 * p['matmul_fraction']:.0f}% of the bf16 matmul rate (TFLOPs counted: weights "
          f"{f['weights'] / 1e12:.3g}, causal attention {f['attention'] / 1e12:.3g}, GDN chunked {f['gdn'] / 1e12:.3g})")
    for row in lc["decode"]:
        if "skipped" in row:
            print(f"decode step at {lc['context']} tokens, batch {row['batch']}: skipped ({row['skipped']})")
        else:
            print(f"decode step at {lc['context']} tokens, batch {row['batch']}: {row['step_ms']:.2f} ms = "
                  f"{row['vs_short_context']:.2f}× the step at {lc['short_context']} tokens")

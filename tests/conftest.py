"""Tiny random Qwen3.5 checkpoints made with `transformers`, saved once per session, and their HF references."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from hylo import LLM

# Every dimension differs from every other (hidden, intermediate sizes, head dims, head counts, vocab,
# experts, top-k, LoRA rank), so a transposed or mis-sliced tensor cannot pass by having the right shape.
# Head counts, intermediate sizes and vocab split by 4, so the same checkpoints serve tensor-parallel
# tests at 1, 2 and 4 ranks (the two KV heads are replicated at 4). Head dims are powers of two for the
# Triton kernels; the hidden size need not be (the kernels mask it).
TEXT = dict(
    vocab_size=320,
    hidden_size=48,
    num_hidden_layers=4,
    num_attention_heads=20,
    num_key_value_heads=2,
    head_dim=32,
    linear_num_key_heads=4,
    linear_num_value_heads=12,
    linear_key_head_dim=8,
    linear_value_head_dim=16,
    initializer_range=0.08,
    eos_token_id=0,
    max_position_embeddings=512,
)
DENSE = dict(intermediate_size=80)
MOE = dict(num_experts=10, num_experts_per_tok=3, moe_intermediate_size=24, shared_expert_intermediate_size=56)
VISION = dict(depth=1, hidden_size=168, intermediate_size=72, num_heads=6, out_hidden_size=TEXT["hidden_size"])
RANK = 5  # the adapters' default LoRA rank
MAX_RANK = 14  # the test engines' max_lora_rank: above the ranks the tests use, and no dimension of the models

KINDS = ["dense", "moe", "dense-vl", "moe-vl"]


def build_hf_model(kind: str, tie: bool = False):
    import transformers as tf

    torch.manual_seed(1234)
    moe = kind.startswith("moe")
    text_cls = tf.Qwen3_5MoeTextConfig if moe else tf.Qwen3_5TextConfig
    text = text_cls(**TEXT, **(MOE if moe else DENSE), tie_word_embeddings=tie)
    if kind.endswith("-vl"):
        cfg_cls = tf.Qwen3_5MoeConfig if moe else tf.Qwen3_5Config
        config = cfg_cls(text_config=text.to_dict(), vision_config=VISION, tie_word_embeddings=tie)
        model_cls = tf.Qwen3_5MoeForConditionalGeneration if moe else tf.Qwen3_5ForConditionalGeneration
    else:
        config = text
        model_cls = tf.Qwen3_5MoeForCausalLM if moe else tf.Qwen3_5ForCausalLM
    model = model_cls(config).eval()
    with torch.no_grad():  # move norms and GDN gates off their neutral init so a wrong wiring shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "dt_bias" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer():
    """A byte-level BPE with exactly TEXT['vocab_size'] entries, so any text (multi-byte too) encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=TEXT["vocab_size"], special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "héllo wörld ✓ 日本語 données", "count: 1 2 3 4 5 6 7 8 9 10"] * 50
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """kind → folder of a saved tiny checkpoint (built on first use)."""
    made: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in made:
            folder = tmp_path_factory.mktemp(kind)
            build_hf_model(kind.removesuffix("-tied"), tie=kind.endswith("-tied")).save_pretrained(folder)
            build_tokenizer().save_pretrained(folder)
            made[kind] = str(folder)
        return made[kind]

    return get


@pytest.fixture(scope="session")
def hf_models(checkpoints):
    """kind → the HF model loaded back from the saved folder (the independent reference)."""
    import transformers as tf

    loaded = {}

    def get(kind: str):
        if kind not in loaded:
            cls = tf.AutoModelForImageTextToText if kind.endswith("-vl") else tf.AutoModelForCausalLM
            loaded[kind] = cls.from_pretrained(checkpoints(kind), dtype=torch.float32).eval()
        return loaded[kind]

    return get


@pytest.fixture(scope="session")
def engines(checkpoints):
    """(kind, options) → a shared LLM; tests that change engine state build their own."""
    built = {}

    def get(kind: str, **options) -> LLM:
        key = (kind, tuple(sorted(options.items())))
        if key not in built:
            # The CPU default (1 GiB, zeroed, so resident) held by every engine kept for the session took the suite near
            # 20 GB; the tiny models' prompts need a few MiB.
            options.setdefault("kv_cache_memory_bytes", 64 << 20)
            built[key] = LLM(checkpoints(kind), device="cpu", progress=False, **options)
        return built[key]

    return get


def hf_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """HF's greedy continuation (full forward each step, EOS not special) and its raw logits ([steps, vocab])."""
    ids, logits = list(prompt), []
    device = next(model.parameters()).device
    with torch.no_grad():
        for _ in range(steps):
            last = model(torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
            logits.append(last)
            ids.append(int(last.argmax()))
    return ids[len(prompt) :], torch.stack(logits)


def random_prompts(lengths: list[int], seed: int = 0, vocab: int = TEXT["vocab_size"]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


DENSE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj", "gate_proj", "up_proj", "down_proj"]
MOE_TARGETS = DENSE_TARGETS + ["shared_expert_gate"]
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, checkpoints):
    """Make a PEFT adapter on a tiny checkpoint: folder of `get_peft_model(...).save_pretrained`, non-zero lora_B."""

    def make(kind: str, seed: int = 0, **lora) -> str:
        from peft import LoraConfig, get_peft_model

        lora.setdefault("r", RANK)
        lora.setdefault("lora_alpha", 8)
        if kind.startswith("moe") and "target_modules" not in lora and "target_parameters" not in lora:
            lora.update(target_modules=MOE_TARGETS, target_parameters=EXPERT_PARAMETERS)
        lora.setdefault("target_modules", DENSE_TARGETS)
        torch.manual_seed(seed)
        model = get_peft_model(build_hf_model(kind.removesuffix("-tied")), LoraConfig(init_lora_weights=False, **lora))
        with torch.no_grad():  # PEFT's random init is tiny next to the base: scale B so every adapter shows
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(3.0)
        folder = tmp_path_factory.mktemp(f"adapter-{kind}")
        model.save_pretrained(folder)
        return str(folder)

    return make


def hf_peft_greedy(kind: str, checkpoint: str, adapter: str | None, prompt: list[int], steps: int, device: str = "cpu"):
    """HF+PEFT's greedy continuation (the reference), base model when adapter is None. Where fla-core is installed
    transformers runs it for GDN, and fla needs CUDA tensors: GPU tests pass device="cuda"."""
    import transformers as tf
    from peft import PeftModel

    cls = tf.AutoModelForImageTextToText if kind.endswith("-vl") else tf.AutoModelForCausalLM
    model = cls.from_pretrained(checkpoint, dtype=torch.float32, device_map=device).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    return hf_greedy(model, prompt, steps)


def per_expert_form(kind: str, checkpoint: str, adapter: str, folder) -> str:
    """Rewrite a target_parameters adapter as per-expert modules (`experts.N.gate_proj` ...: a form some trainers
    write, which PEFT cannot make on transformers' fused experts). Each expert's A and B are PEFT's own factors
    (ParamWrapper.get_delta_factors) and gate_up_proj's rows are [gate | up] as transformers' forward chunks them,
    so HF+PEFT on `adapter` is the reference for the result."""
    import json
    from pathlib import Path

    import transformers as tf
    from peft import PeftModel
    from peft.tuners.lora.layer import ParamWrapper
    from safetensors.torch import save_file

    cls = tf.AutoModelForImageTextToText if kind.endswith("-vl") else tf.AutoModelForCausalLM
    model = PeftModel.from_pretrained(cls.from_pretrained(checkpoint, dtype=torch.float32), adapter)
    tensors = {}
    for name, module in model.named_modules():
        if not isinstance(module, ParamWrapper):
            continue
        b, a, _ = module.get_delta_factors("default")  # [E, out, r], [E, r, in] (scaling: from the config)
        experts = name.replace(".base_layer", "")
        parts = ["gate_proj", "up_proj"] if module.parameter_name == "gate_up_proj" else ["down_proj"]
        for e in range(module.num_experts):
            for part, b_part in zip(parts, b[e].chunk(len(parts))):
                tensors[f"{experts}.{e}.{part}.lora_A.weight"] = a[e].detach().clone()
                tensors[f"{experts}.{e}.{part}.lora_B.weight"] = b_part.detach().contiguous()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    config.update(target_modules=r".*\.experts\.\d+\.(gate_proj|up_proj|down_proj)", target_parameters=None)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return str(folder)


def break_sampling(monkeypatch, seed: int, message: str) -> None:
    """The engine's samplers (the synchronous one and the one async scheduling uses) raise `message` for any batch with
    a request of this seed."""
    import hylo.engine.engine as engine_module

    def failing(real):
        def sample(logits, inputs):
            if any(i.params.seed == seed for i in inputs):
                raise RuntimeError(message)
            return real(logits, inputs)
        return sample

    monkeypatch.setattr(engine_module, "sample", failing(engine_module.sample))
    monkeypatch.setattr(engine_module, "sample_on_device", failing(engine_module.sample_on_device))

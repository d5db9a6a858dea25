"""Build the embedded demo: a tiny Qwen3.5 hybrid checkpoint trained to count, and two LoRA adapters.

Run with the project's venv: `python scripts/make_demo.py` (about five minutes on two CPU cores).
Deterministic: fixed seeds, fixed data. Writes src/hylo/demo/base and src/hylo/demo/adapters/*.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from hylo.demo.tasks import STARTS, TASKS, expected_continuation, prompt_for  # noqa: E402

OUT = ROOT / "src" / "hylo" / "demo"
VOCAB = 320
EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj", "gate_proj", "up_proj", "down_proj"]


def examples(task: str) -> list[str]:
    return [prompt_for(s) + expected_continuation(task, prompt_for(s)) for s in STARTS]


def build_tokenizer() -> tf.PreTrainedTokenizerFast:
    """Byte-level BPE: every string encodes (multi-byte characters too); merges learned on the task text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOS, "<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([t for task in TASKS for t in examples(task)] * 4, trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, chat_template=CHAT_TEMPLATE)


def build_model(eos_id: int) -> tf.Qwen3_5ForCausalLM:
    config = tf.Qwen3_5TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        tie_word_embeddings=True, max_position_embeddings=256, eos_token_id=eos_id, bos_token_id=eos_id, pad_token_id=eos_id,
    )
    return tf.Qwen3_5ForCausalLM(config)


def batches(tokenizer, task: str, steps: int, size: int, seed: int):
    texts = examples(task)
    rng = random.Random(seed)
    for _ in range(steps):
        chosen = [rng.choice(texts) + EOS for _ in range(size)]
        enc = tokenizer(chosen, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc.input_ids.clone()
        labels[enc.attention_mask == 0] = -100
        # The end-of-text token is also the pad token: keep the first one of each row as a label.
        lengths = enc.attention_mask.sum(1)
        labels[torch.arange(size), lengths - 1] = enc.input_ids[torch.arange(size), lengths - 1]
        yield enc.input_ids, enc.attention_mask, labels


def train(model, tokenizer, task: str, steps: int, lr: float, seed: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    start = time.time()
    for step, (ids, mask, labels) in enumerate(batches(tokenizer, task, steps, 32, seed)):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        sched.step()
        optim.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"  {task} step {step:4d} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    model.eval()


@torch.no_grad()
def accuracy(model, tokenizer, task: str) -> float:
    right = 0
    for s in STARTS:
        prompt = prompt_for(s)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        right += tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == expected_continuation(task, prompt)
    return right / len(STARTS)


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer.eos_token_id)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    train(model, tokenizer, "base", steps=1500, lr=3e-3, seed=1)
    base_acc = accuracy(model, tokenizer, "base")
    print(f"base accuracy: {base_acc:.1%}")
    base_dir = OUT / "base"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    for i, task in enumerate(TASKS[1:]):
        base = tf.Qwen3_5ForCausalLM.from_pretrained(base_dir)
        torch.manual_seed(10 + i)
        peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        train(peft, tokenizer, task, steps=600, lr=4e-3, seed=20 + i)
        print(f"{task} accuracy: {accuracy(peft, tokenizer, task):.1%}")
        # A relative name, not this machine's folder, and no generated model card.
        peft.peft_config["default"].base_model_name_or_path = "hylo/demo/base"
        peft.save_pretrained(OUT / "adapters" / task)
        (OUT / "adapters" / task / "README.md").unlink(missing_ok=True)


if __name__ == "__main__":
    main()

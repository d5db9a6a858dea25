"""Reading a Qwen3.5 checkpoint's configuration, and the engine's own settings."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "Qwen3_5ForCausalLM",
    "Qwen3_5ForConditionalGeneration",
    "Qwen3_5MoeForCausalLM",
    "Qwen3_5MoeForConditionalGeneration",
)


class ModelError(ValueError):
    """The checkpoint folder cannot be served; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class ModelConfig:
    """The text model's hyper-parameters, whichever layout the checkpoint uses."""

    path: Path
    architecture: str
    text: Any  # transformers' Qwen3_5TextConfig or Qwen3_5MoeTextConfig
    tie_word_embeddings: bool
    dtype: str | None  # as the checkpoint stores it

    @property
    def is_moe(self) -> bool:
        return "Moe" in self.architecture

    @property
    def checkpoint_prefix(self) -> str:
        """Where the text model's tensors live in the checkpoint."""
        return "model.language_model." if self.architecture.endswith("ForConditionalGeneration") else "model."

    @property
    def layer_types(self) -> list[str]:
        return list(self.text.layer_types)


def read_model_config(path: str | Path) -> ModelConfig:
    folder = Path(path)
    if not folder.is_dir():
        raise ModelError(f"model folder '{folder}' does not exist; pass the path of a local checkpoint folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelError(f"'{folder}' has no config.json; is it a Hugging Face checkpoint folder?")
    raw = read_json(config_file, ModelError)
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ModelError(
            f"'{folder}': architecture {archs or raw.get('model_type')} is not supported; "
            f"hylo serves {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad config
        raise ModelError(f"'{config_file}' could not be read as a {arch} config: {e}") from None
    text = hf.text_config if arch.endswith("ForConditionalGeneration") else hf
    _check_supported(text, folder)
    tie = bool(getattr(hf, "tie_word_embeddings", False))
    dtype = raw.get("dtype") or raw.get("torch_dtype") or (raw.get("text_config") or {}).get("dtype")
    return ModelConfig(folder, arch, text, tie, dtype)


def read_json(path: Path, error: type[ValueError]) -> dict:
    """A JSON object from `path`, or `error` naming the file."""
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"'{path}' is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise error(f"'{path}' must hold a JSON object")
    return raw


def _check_supported(text: Any, folder: Path) -> None:
    rope = dict(getattr(text, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ModelError(f"'{folder}': rope_type '{rope['rope_type']}' is not supported (only 'default')")
    if getattr(text, "attention_bias", False):
        raise ModelError(f"'{folder}': attention_bias=true is not supported by hylo's Qwen3.5 model")
    bad = set(text.layer_types) - {"linear_attention", "full_attention"}
    if bad or len(text.layer_types) != text.num_hidden_layers:
        raise ModelError(f"'{folder}': layer_types must list linear_attention/full_attention for every layer")

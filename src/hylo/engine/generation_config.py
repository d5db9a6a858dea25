"""Sampling defaults from a checkpoint's `generation_config.json`, chosen as vLLM's `--generation-config` does.

- "auto": the model folder's file (none there: no defaults);
- "vllm": hylo's own defaults, the file ignored;
- a folder: its generation_config.json, which must exist.

The defaults apply to what a request leaves unset: `LLM.generate` without SamplingParams
(`LLM.get_default_sampling_params()`), and the server's fields a request does not send.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hylo.config import ModelError, read_json
from hylo.sampling import InvalidParam, SamplingParams

log = logging.getLogger("hylo")

FILE = "generation_config.json"
# What vLLM reads from the file, plus the two penalties (Qwen's model cards recommend a presence_penalty).
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def generation_config_file(setting: str, model_path: Path) -> Path | None:
    """The file that `setting` names (None: no defaults); ValueError naming the setting if a folder lacks one."""
    if setting == "vllm":
        return None
    if setting == "auto":
        file = model_path / FILE
        return file if file.is_file() else None
    file = Path(setting) / FILE
    if not file.is_file():
        raise ValueError(f"generation_config='{setting}': there is no {FILE} in that folder; "
                         f"give auto (the model folder's), vllm (hylo's defaults) or a folder that holds one")
    return file


def default_sampling(setting: str, model_path: Path) -> dict[str, Any]:
    """SamplingParams field → default value, from the generation config that `setting` picks."""
    file = generation_config_file(setting, model_path)
    if file is None:
        return {}
    raw = read_json(file, ModelError)
    defaults = {key: raw[key] for key in SAMPLING_KEYS if raw.get(key) is not None}
    if raw.get("max_new_tokens") is not None:
        defaults["max_tokens"] = raw["max_new_tokens"]  # HF's max_new_tokens is vLLM's max_tokens
    try:
        SamplingParams(**defaults)
    except InvalidParam as e:
        raise ModelError(f"'{file}': {e.param}={defaults.get(e.param)!r} is not a valid sampling default ({e}); "
                         f"fix the file, or start with generation_config='vllm' to ignore it") from None
    if defaults:
        log.warning("default sampling parameters come from the model's %s: %s (what a request sets wins; "
                    "start with --generation-config vllm to ignore the file)", FILE,
                    ", ".join(f"{k}={v}" for k, v in defaults.items()))
    return defaults

"""PEFT's adapter_config.json: what hylo accepts, and PEFT's own rules for targets, ranks and scaling."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from hylo.config import read_json


class AdapterError(ValueError):
    """An adapter hylo refuses; the message names the module and the reason."""


# Options that change the math in ways hylo does not implement; refusing beats silently ignoring them.
UNSUPPORTED = {
    "use_dora": "DoRA adapters (use_dora=true) are not supported; merge the adapter into the base model instead",
    "modules_to_save": "modules_to_save replaces whole modules, which a shared multi-adapter engine cannot do; retrain without it",
    "fan_in_fan_out": "fan_in_fan_out=true is for Conv1D-style layers, which Qwen3.5 does not have",
    "lora_bias": "LoRA bias terms (lora_bias=true) are not supported",
    "layer_replication": "layer_replication changes the model's depth and is not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "use_qalora": "QA-LoRA adapters are not supported",
}


@dataclass(frozen=True)
class PeftConfig:
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict
    alpha_pattern: dict
    target_modules: list[str] | str | None
    target_parameters: list[str]
    layers_to_transform: list[int] | int | None
    layers_pattern: list[str] | str | None
    exclude_modules: list[str] | str | None

    def rank_and_scaling(self, key: str) -> tuple[int, float]:
        """PEFT's per-module rank and scaling: patterns match a suffix of the module's full name."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, key), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, key), self.lora_alpha)
        return r, alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets_module(self, key: str) -> bool:
        """Whether PEFT would wrap the module named `key` (its name in the reference model)."""
        if self.exclude_modules:
            if isinstance(self.exclude_modules, str):
                if re.fullmatch(self.exclude_modules, key):
                    return False
            elif key in self.exclude_modules or any(key.endswith("." + m) for m in self.exclude_modules):
                return False
        if self.target_modules is None:
            return False
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, key) is not None
        if key in self.target_modules:
            return True
        if not any(key.endswith("." + t) for t in self.target_modules):
            return False
        return self._in_transformed_layers(key)

    def targets_parameter(self, key: str) -> bool:
        return any(key == t or key.endswith("." + t) for t in self.target_parameters)

    def _in_transformed_layers(self, key: str) -> bool:
        layers = self.layers_to_transform
        if layers is None or (isinstance(layers, list) and not layers):
            return True
        patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else (self.layers_pattern or [])
        match = None
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == layers if isinstance(layers, int) else index in layers


def _pattern_key(patterns: dict, key: str) -> str:
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def read_peft_config(folder: Path) -> PeftConfig:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"adapter folder '{folder}' has no adapter_config.json; is it a PEFT LoRA folder?")
    raw = read_json(path, AdapterError)
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"'{folder}' is a {raw.get('peft_type')} adapter; hylo serves LoRA adapters only")
    for option, why in UNSUPPORTED.items():
        if raw.get(option):
            raise AdapterError(f"adapter '{folder}': {why}")
    if raw.get("bias", "none") != "none":
        raise AdapterError(f"adapter '{folder}': bias='{raw['bias']}' trains base biases, which hylo does not apply; retrain with bias='none'")
    for name in ("r", "lora_alpha"):
        if not _number(raw.get(name), whole=name == "r") or raw[name] <= 0:
            raise AdapterError(f"adapter '{folder}': adapter_config.json needs a positive '{name}', got {raw.get(name)!r}")
    _check_types(folder, raw)
    targets = raw.get("target_modules")
    if isinstance(targets, (list, tuple, set)):
        targets = list(targets)
    if not targets and not raw.get("target_parameters"):
        raise AdapterError(f"adapter '{folder}': adapter_config.json names no target_modules or target_parameters")
    return PeftConfig(
        r=int(raw["r"]),
        lora_alpha=raw["lora_alpha"],
        use_rslora=bool(raw.get("use_rslora")),
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        target_modules=targets,
        target_parameters=list(raw.get("target_parameters") or []),
        layers_to_transform=raw.get("layers_to_transform"),
        layers_pattern=raw.get("layers_pattern"),
        exclude_modules=raw.get("exclude_modules"),
    )


def _number(value, whole: bool = False) -> bool:
    """A finite JSON number (an integer if `whole`); not a boolean."""
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        return False
    return math.isfinite(value)


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# adapter_config.json fields past r and lora_alpha: (accepts the value, what it must be). null is PEFT's default for each.
FIELD_TYPES = {
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "target_modules": (lambda v: isinstance(v, str) or _strings(v), "a regular expression or a list of module names"),
    "target_parameters": (_strings, "a list of parameter names"),
    "exclude_modules": (lambda v: isinstance(v, str) or _strings(v), "a regular expression or a list of module names"),
    "layers_to_transform": (lambda v: _number(v, True) or isinstance(v, list) and all(_number(i, True) for i in v), "a layer index or a list of them"),
    "layers_pattern": (lambda v: isinstance(v, str) or _strings(v), "a name or a list of names"),
    "rank_pattern": (lambda v: isinstance(v, dict) and all(_number(r, True) and r > 0 for r in v.values()), "an object of pattern -> positive integer rank"),
    "alpha_pattern": (lambda v: isinstance(v, dict) and all(_number(a) and a > 0 for a in v.values()), "an object of pattern -> positive number"),
}


def _check_types(folder: Path, raw: dict) -> None:
    """Each field hylo reads has PEFT's type, and each regular expression compiles: a config that PEFT would
    choke on is refused naming the field, not with an error from deep inside the loader."""
    for name, (ok, want) in FIELD_TYPES.items():
        value = raw.get(name)
        if value is not None and not ok(value):
            raise AdapterError(f"adapter '{folder}': adapter_config.json's '{name}' must be {want}, got {_shown(value)}")
    patterns = [(n, raw[n]) for n in ("target_modules", "exclude_modules") if isinstance(raw.get(n), str)]
    patterns += [(n, p) for n in ("rank_pattern", "alpha_pattern") for p in raw.get(n) or {}]
    for name, pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise AdapterError(f"adapter '{folder}': adapter_config.json's '{name}' holds {_shown(pattern)}, which is not a regular expression ({e})") from None


def _shown(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

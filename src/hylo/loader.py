"""Safetensors checkpoint → the model's declared parts, strict in both directions.

Every checkpoint tensor of the text model must be claimed by a declared part, and every parameter
must be filled exactly once; anything else is an error that names the tensors.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from hylo.config import ModelConfig, ModelError
from hylo.distributed import TPGroup
from hylo.layers.parts import Part, declared

log = logging.getLogger("hylo")

# Tensors a Qwen3.5 checkpoint may carry that the text model does not use.
SKIPPED_PREFIXES = {
    "model.visual.": "the vision tower (hylo serves text only for now)",
    "mtp.": "the multi-token-prediction head",
}


def declared_parts(model: nn.Module) -> dict[str, tuple[str, Part]]:
    """Every checkpoint name the model claims → (owning module path, part). A name claimed twice is a bug."""
    claims: dict[str, tuple[str, Part]] = {}
    for name, path, _, part in declared(model):
        if name in claims:
            raise AssertionError(f"'{name}' is declared by both {claims[name][0]} and {path}")
        claims[name] = (path, part)
    return claims


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelError(f"'{index}' is not a valid safetensors index ({e})") from None
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"'{folder}': shards listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"'{folder}' has no *.safetensors weights (hylo loads safetensors checkpoints only)")
    return files


def load_weights(model: nn.Module, config: ModelConfig, tp: TPGroup, progress: bool = True) -> None:
    claims = declared_parts(model)
    prefix = config.checkpoint_prefix
    written: dict[int, int] = defaultdict(int)
    unexpected: list[str] = []
    loaded: set[str] = set()
    skipped: dict[str, int] = defaultdict(int)
    files = checkpoint_files(config.path)
    bar = tqdm(total=len(files), desc="Loading weights", unit="file", disable=not progress or tp.rank != 0)
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    name = _model_name(key, prefix)
                    if name is None:
                        skipped[_skip_reason(key)] += 1
                        continue
                    if name not in claims:
                        unexpected.append(key)
                        continue
                    _, part = claims[name]
                    tensor = f.get_tensor(key)
                    with torch.no_grad():
                        written[_storage(part.target)] += part.load(tensor, tp.rank, tp.size, key)
                    loaded.add(name)
        except (SafetensorError, OSError) as e:
            raise ModelError(f"'{file}' is not a readable safetensors file ({e}); re-download or re-save it") from None
        bar.update(1)
    bar.close()
    for reason, count in skipped.items():
        log.info("skipped %d checkpoint tensors of %s", count, reason)
    if unexpected:
        raise ModelError(
            f"'{config.path}': {len(unexpected)} checkpoint tensors are not part of a {config.architecture}: "
            f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
    _check_filled(model, claims, written, loaded, config)


def _model_name(key: str, prefix: str) -> str | None:
    if key.startswith(prefix):
        return "model." + key[len(prefix) :]
    if key == "lm_head.weight":
        return key
    if any(key.startswith(p) for p in SKIPPED_PREFIXES):
        return None
    return key  # reported as unexpected unless claimed


def _skip_reason(key: str) -> str:
    return next(reason for p, reason in SKIPPED_PREFIXES.items() if key.startswith(p))


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _check_filled(model: nn.Module, claims: dict, written: dict[int, int], loaded: set[str], config: ModelConfig) -> None:
    """Each parameter must be written exactly once over: fewer elements means missing tensors, more means duplicates."""
    by_param: dict[int, list[str]] = defaultdict(list)
    for name, (_, part) in claims.items():
        by_param[_storage(part.target)].append(name)
    problems = []
    for pname, param in model.named_parameters():
        got = written.get(_storage(param), 0)
        if got < param.numel():
            missing = [_checkpoint_name(n, config) for n in by_param[_storage(param)] if n not in loaded]
            problems.append("missing " + ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else ""))
        elif got > param.numel():
            problems.append(f"{pname} was written more than once (the checkpoint holds two forms of one tensor)")
    if problems:
        raise ModelError(f"'{config.path}' does not fit a {config.architecture}: " + "; ".join(problems[:8]))


def _checkpoint_name(name: str, config: ModelConfig) -> str:
    return config.checkpoint_prefix + name[len("model.") :] if name.startswith("model.") else name


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of realistic scale (for benchmarks on shapes whose weights are not at hand)."""
    from hylo.layers.gdn import HeadwiseParams
    from hylo.layers.norm import GatedRMSNorm

    generators: dict[torch.device, torch.Generator] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            g = generators.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
            p.normal_(0.0, 0.02, generator=g)
        if isinstance(module, GatedRMSNorm):
            module.weight.fill_(1.0)
        if isinstance(module, HeadwiseParams):
            module.A_log.uniform_(1.0, 16.0).log_()
            module.dt_bias.fill_(1.0)

"""Reading a PEFT LoRA folder into full (unsharded) A/B per declared part, or refusing it with a report.

Every tensor in the file must land in exactly one declared part whose forward applies it, and every
module the config targets must have its tensors; anything else is refused, never silently dropped.
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import re
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from hylo.config import ModelConfig
from hylo.layers.parts import Part, declared
from hylo.lora.lazy import LazyTensor
from hylo.lora.peft_config import AdapterError, PeftConfig, read_peft_config
from hylo.lora.request import LoRARequest

PEFT_PREFIX = "base_model.model."
NOT_2D = "LoRA's A and B are matrices, and one of these is not 2-D: an adapter of another kind?"
# Why a module that PEFT can wrap in the reference model takes no adapter here.
NOT_APPLIED = {
    "conv1d": "hylo does not apply LoRA to the GDN conv1d; retrain without 'conv1d' in target_modules",
    "embed_tokens": "hylo does not apply LoRA to embeddings; retrain without 'embed_tokens'",
    "lm_head": "hylo does not apply LoRA to lm_head; retrain without 'lm_head'",
    "gate": "hylo does not apply LoRA to the MoE router 'gate'; retrain without it",
}


@dataclass(frozen=True)
class LoRATarget:
    """A declared part that takes LoRA: the layer that owns it and the part itself."""

    name: str  # model-side name of the target, e.g. model.layers.0.linear_attn.in_proj_z
    layer_path: str  # e.g. model.layers.0.linear_attn.in_proj (the fused layer)
    layer: nn.Module
    part: Part


def lora_targets(model: nn.Module) -> dict[str, LoRATarget]:
    """Every LoRA target the model declares, by name (derived from the parts, like the loader's names)."""
    out = {}
    for key, path, module, part in declared(model):
        if part.lora:
            name = key[: len(key) - len(part.key)] + part.module
            out[name] = LoRATarget(name, path, module, part)
    return out


def untargetable(model: nn.Module) -> dict[str, str]:
    """Module names the model has that take no LoRA → why (for refusals that name the reason)."""
    out = {}
    for key, _, _, part in declared(model):
        if part.lora is None:
            name = key.removesuffix(".weight")
            leaf = name.rpartition(".")[2]
            out[name] = NOT_APPLIED.get(leaf, f"hylo does not apply LoRA to '{leaf}'; retrain without it")
    return out


@dataclass
class TensorReport:
    """One adapter tensor: where it lands, or why it is refused (the check-adapter report's rows)."""

    key: str
    shape: list[int]
    target: LoRATarget | None = None
    error: str | None = None


@dataclass
class Adapter:
    request: LoRARequest
    rank: int
    # target name → (A [r, in], scaling·B [out, r]), read from the file only where a rank indexes them
    weights: dict[str, tuple[LazyTensor, LazyTensor]]
    report: list[TensorReport] = field(default_factory=list)


_declarations: weakref.WeakKeyDictionary[nn.Module, tuple[dict[str, LoRATarget], dict[str, str]]] = weakref.WeakKeyDictionary()


def read_adapter(
    request: LoRARequest, model: nn.Module, model_config: ModelConfig, max_rank: int, strict: bool = True
) -> Adapter:
    """Validate `request`'s folder against the model's declarations; raise AdapterError on any refusal.

    Names, shapes, ranks and the config are checked from the file's header; the values are read later, by
    each rank for its own slices (`LazyTensor`), and checked for NaN and infinity there. With strict=False
    the report is returned with its errors instead, every value read and checked (for check-adapter).
    """
    folder = Path(request.lora_path)
    if not folder.is_dir():
        raise AdapterError(f"adapter '{request.lora_name}': folder '{folder}' does not exist")
    config = read_peft_config(folder)
    shapes, tensors = _open_tensors(folder, request.lora_name)
    if model not in _declarations:  # worked out once per model: a read runs beside the decode steps
        _declarations[model] = (lora_targets(model), untargetable(model))
    reader = _Reader(request, config, model_config, *_declarations[model], max_rank, read_values=not strict)
    adapter = reader.read(shapes, tensors)
    errors = reader.config_errors + [r for r in adapter.report if r.error]
    if errors and strict:
        # One line per module and reason (its A and B tensors share them).
        lines = list(dict.fromkeys(f"  {re.sub(r'[.](lora_A|lora_B)[.]weight$', '', r.key)}: {r.error}" for r in errors))
        more = [f"  ... and {len(lines) - 12} more"] if len(lines) > 12 else []
        raise AdapterError(f"adapter '{request.lora_name}' ({folder}) is refused:\n" + "\n".join(lines[:12] + more))
    adapter.report += reader.config_errors
    return adapter


def _open_tensors(folder: Path, name: str) -> tuple[dict[str, list[int]], dict[str, LazyTensor]]:
    """Every tensor's shape, and the 2-D ones as LazyTensors; a safetensors file is only opened (its header read)."""
    st, pt = folder / "adapter_model.safetensors", folder / "adapter_model.bin"

    def corrupt(e: Exception) -> AdapterError:
        return AdapterError(f"adapter '{name}': weights file in '{folder}' is unreadable or corrupt ({e})")

    try:
        if st.is_file():
            handle = safe_open(str(st), "pt")  # checks the header, and that its tensors cover the file exactly
            mapped = _mapped_tensors(st)
            shapes = {key: list(mapped[key].shape) if key in mapped else handle.get_slice(key).get_shape() for key in handle.keys()}

            def fetcher(key: str):
                if key in mapped:
                    return lambda rows, cols, full=mapped[key]: full[rows, cols]

                def fetch(rows: slice, cols: slice) -> torch.Tensor:
                    try:
                        return handle.get_slice(key)[rows, cols]
                    except (SafetensorError, OSError, RuntimeError) as e:
                        raise corrupt(e) from None
                return fetch
        elif pt.is_file():
            loaded = torch.load(str(pt), map_location="cpu", weights_only=True)
            shapes = {key: list(t.shape) if isinstance(t, torch.Tensor) else [] for key, t in loaded.items()}

            def fetcher(key: str):
                return lambda rows, cols: loaded[key][rows, cols]
        else:
            raise AdapterError(f"adapter '{name}': '{folder}' has no adapter_model.safetensors or adapter_model.bin")
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as e:  # ValueError: the file changed since opened
        raise corrupt(e) from None
    tensors = {}
    for key, shape in shapes.items():
        module, _, matrix = re.sub(r"[.]weight$", "", key).rpartition(".")
        if len(shape) == 2:
            tensors[key] = LazyTensor.stored(fetcher(key), shape, module, matrix)
    return shapes, tensors


# safetensors' dtype names → torch's, for the dtypes an adapter's A and B are stored in
_FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _mapped_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's non-empty float tensors as views of one copy-on-write mapping of it (its header checked by safe_open):
    a rank's slices are views, copied once, straight into its image (AdapterStore.register), and only their pages are
    read. Other tensors, and every tensor on a big-endian host, are read by safetensors."""
    if sys.byteorder != "little":
        return {}
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable (as torch.frombuffer wants), never written
    out = {}
    for key, info in header.items():
        if key != "__metadata__" and info["dtype"] in _FLOAT_DTYPES and math.prod(info["shape"]):
            out[key] = torch.frombuffer(data, dtype=_FLOAT_DTYPES[info["dtype"]], count=math.prod(info["shape"]),
                                        offset=8 + size + info["data_offsets"][0]).view(info["shape"])
    return out


class _Reader:
    def __init__(self, request, config: PeftConfig, model_config: ModelConfig, targets, untargetable, max_rank: int, read_values: bool):
        self.request = request
        self.read_values = read_values
        self.config = config
        self.model_config = model_config
        self.targets = targets
        self.untargetable = untargetable
        self.max_rank = max_rank
        self.config_errors: list[TensorReport] = []

    def peft_name(self, model_name: str) -> str:
        """The module's name in the reference model, which PEFT's patterns are matched against."""
        return self.model_config.checkpoint_prefix + model_name[len("model.") :] if model_name.startswith("model.") else model_name

    def model_name(self, peft_name: str) -> str | None:
        prefix = self.model_config.checkpoint_prefix
        if peft_name.startswith(prefix):
            return "model." + peft_name[len(prefix) :]
        if peft_name.startswith("lm_head"):
            return peft_name
        return None

    def read(self, shapes: dict[str, list[int]], tensors: dict[str, LazyTensor]) -> Adapter:
        report: list[TensorReport] = []
        pairs: dict[str, dict[str, str]] = {}
        for key, shape in shapes.items():
            row = TensorReport(key, shape)
            report.append(row)
            match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", key)
            if not key.startswith(PEFT_PREFIX) or match is None:
                row.error = "not a LoRA A/B tensor under base_model.model. (the names PEFT writes)"
                continue

            module = match.group(1)[len(PEFT_PREFIX) :].replace(".base_layer", "")
            pairs.setdefault(module, {})[match.group(2)] = key
        weights: dict[str, tuple[LazyTensor, LazyTensor]] = {}
        rows = {r.key: r for r in report}
        seen_targets: set[str] = set()
        for module, ab in pairs.items():
            if set(ab) != {"lora_A", "lora_B"}:
                for key in ab.values():
                    rows[key].error = f"'{module}' has only {', '.join(ab)}; LoRA needs both lora_A and lora_B"
                continue
            if module.endswith(".experts") and self.config.target_parameters:
                continue  # PEFT's wrapped 3D parameters: read below, one A/B pair per parameter
            error = self._place(module, tensors.get(ab["lora_A"]), tensors.get(ab["lora_B"]), weights, rows, ab, seen_targets)
            if error:
                for key in ab.values():
                    rows[key].error = error
        self._read_nested_expert_params(tensors, rows, weights, seen_targets)
        self._check_coverage(seen_targets)
        rank = max((a.shape[0] for a, _ in weights.values()), default=0)
        return Adapter(self.request, rank, weights, report)

    # -- one module's A/B -------------------------------------------------------------------------

    def _place(self, module, a, b, weights, rows, ab, seen) -> str | None:
        model_name = self.model_name(module)
        if module.startswith("model.visual."):
            return "targets the vision tower, which hylo does not serve yet; retrain on the language model only"
        if model_name is None:
            return f"'{module}' is not a module of this {self.model_config.architecture}"
        leaf = model_name.rpartition(".")[2]
        if model_name in self.untargetable:
            return self.untargetable[model_name]
        if a is None or b is None:
            return NOT_2D
        if leaf in ("in_proj_qkvz", "in_proj_ba"):
            return self._split_fused(model_name, module, a, b, weights, rows, ab, seen)
        target = self.targets.get(model_name)
        if target is None or target.part.lora == "parameter":
            return f"'{module}' is not a module of this {self.model_config.architecture} (an adapter for another model?)"
        if not self.config.targets_module(module):
            if self.config.targets_parameter(f"{module}.weight"):
                # PEFT wraps the 2D weight as a parameter here; hylo reads target_parameters for the fused experts only.
                return (f"'{module}' is targeted through target_parameters ('{module}.weight'), which hylo applies to the "
                        "MoE's fused expert tensors only; retrain with this module in target_modules")
            return f"'{module}' has tensors but the adapter's target_modules does not cover it, so PEFT would not load them"
        for key in ab.values():
            rows[key].target = target
        seen.add(target.name)  # present, even if refused below: coverage must not call it missing
        return self._add(module, target, a, b, weights)

    def _add(self, peft_key: str, target: LoRATarget, a, b, weights) -> str | None:
        out_features, in_features = _full_2d_shape(target.part)
        r = a.shape[0]
        if list(a.shape) != [r, in_features] or list(b.shape) != [out_features, r]:
            return (
                f"shapes A {list(a.shape)}, B {list(b.shape)} do not fit {target.name} "
                f"(expects A [r, {in_features}], B [{out_features}, r]): an adapter for another model?"
            )
        if r > self.max_rank:
            return f"rank {r} is above max_lora_rank={self.max_rank}; start the engine with max_lora_rank >= {r}"
        r_config, scaling = self.config.rank_and_scaling(peft_key)
        if r_config != r:
            return f"adapter_config.json gives rank {r_config} for this module but its tensors have rank {r}"
        b = b.scaled(scaling)
        if self.read_values:  # serving checks the values each rank reads (AdapterStore.register)
            for t in (a, b):
                if why := t.non_finite(t.values()):
                    return why
        weights[target.name] = (a, b)
        return None

    # -- fused-name adapters (Qwen3-Next style exports) --------------------------------------------

    def _split_fused(self, model_name, module, a, b, weights, rows, ab, seen) -> str | None:
        """in_proj_qkvz → in_proj_qkv + in_proj_z, in_proj_ba → in_proj_b + in_proj_a, when the row order is certain.

        Exporters order these rows either flat ([q|k|v|z]) or grouped per key head (Qwen3-Next's
        layout); the two coincide only with a single key head, so only then is the split unambiguous.
        """
        text = self.model_config.text
        parent, _, leaf = model_name.rpartition(".")
        names = ["in_proj_qkv", "in_proj_z"] if leaf == "in_proj_qkvz" else ["in_proj_b", "in_proj_a"]
        if text.linear_num_key_heads != 1:
            return (
                f"'{leaf}' rows may be ordered flat or grouped per key head; with {text.linear_num_key_heads} key heads "
                f"the two differ and the adapter does not say which; re-export with split {' and '.join(names)}"
            )
        start = 0
        for name in names:
            target = self.targets[f"{parent}.{name}"]
            size = target.part.size
            for key in ab.values():
                rows[key].target = target
            seen.add(target.name)
            error = self._add(module, target, a, b[start : start + size], weights)
            if error:
                return error
            start += size
        return None if start == b.shape[0] else f"'{leaf}' has {b.shape[0]} rows, the split parts {start}"

    # -- PEFT target_parameters on fused 3D experts ------------------------------------------------

    def _read_nested_expert_params(self, tensors, rows, weights, seen) -> None:
        """PEFT's ParamWrapper saves one A/B pair per wrapped 3D parameter, nested by `.base_layer`.

        For a 3D parameter [E, out, in] (transformers' experts: gate_up_proj [E, 2·I, H], down_proj
        [E, H, I], not `is_transposed`) PEFT makes A [r·E, in] (expert-major: row e·r + k) and B
        [out, r·E] (rank-major: column k·E + e), and expert e's delta is B_e @ A_e [out, in]
        (ParamWrapper.get_delta_factors). The pair is matched to the parameter whose shape it fits,
        then rewritten as per-expert A/B for the per-expert parts."""
        if not self.config.target_parameters:
            return
        groups: dict[str, dict[str, str]] = {}
        for key in tensors:
            m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+\.experts)((?:\.base_layer)*)\.(lora_A|lora_B)\.weight", key)
            if m:
                groups.setdefault(m.group(1) + m.group(2), {})[m.group(3)] = key
        for wrapped, ab in groups.items():
            module = wrapped.replace(".base_layer", "")
            error = self._place_expert_param(module, tensors, ab, rows, weights, seen)
            if error:
                for key in ab.values():
                    rows[key].error = error

    def _place_expert_param(self, module, tensors, ab, rows, weights, seen) -> str | None:
        if set(ab) != {"lora_A", "lora_B"}:
            return f"'{module}' has only {', '.join(ab)}; LoRA needs both lora_A and lora_B"
        model_name = self.model_name(module)
        a, b = tensors.get(ab["lora_A"]), tensors.get(ab["lora_B"])
        if a is None or b is None:
            return NOT_2D
        candidates = [t for n, t in self.targets.items() if t.part.lora == "parameter" and n.rpartition(".")[0] == model_name]
        fits = [t for t in candidates if a.shape[1] == t.part.full_shape()[-1] and b.shape[0] == t.part.full_shape()[-2]]
        if len(fits) != 1:
            return f"'{module}' A {list(a.shape)} / B {list(b.shape)} fit no single expert tensor of this model"
        target = fits[0]
        seen.add(target.name)
        for key in ab.values():
            rows[key].target = target
        param_key = f"{module}.{target.part.module.rpartition('.')[2]}"
        if not self.config.targets_parameter(param_key):
            return f"'{param_key}' has tensors but target_parameters does not name it"
        experts = target.part.full_shape()[0]
        if a.shape[0] % experts:
            return f"'{param_key}': A has {a.shape[0]} rows, not a multiple of {experts} experts"
        r = a.shape[0] // experts
        parent = target.name.rpartition(".")[0]  # ...mlp.experts → per-expert parts ...mlp.experts.N.<block>
        blocks = target.part.blocks
        for e in range(experts):
            a_e, b_e = a[e * r : (e + 1) * r], b[:, e::experts]  # A's rows e·r.., B's columns k·E + e
            # gate_up_proj's blocks run along its output rows ([gate | up]): B splits between them.
            # down_proj's one block runs along its input (the intermediate size): B stays whole.
            starts = itertools.accumulate((block.size for block in blocks), initial=0)
            b_blocks = [b_e[start : start + block.size] for start, block in zip(starts, blocks)] if target.part.splits_output else [b_e]
            for block, b_block in zip(blocks, b_blocks, strict=True):
                error = self._add(param_key, self.targets[f"{parent}.{e}.{block.name}"], a_e, b_block, weights)
                if error:
                    return error
        return None

    # -- everything the config targets must be present -------------------------------------------

    def _check_coverage(self, seen: set[str]) -> None:
        for name, target in self.targets.items():
            peft_key = self.peft_name(name)
            if target.part.lora == "module" and self.config.targets_module(peft_key) and name not in seen:
                self._config_error(peft_key, "adapter_config.json targets this module but the file has no tensors for it")
            if target.part.lora == "parameter" and self.config.targets_parameter(peft_key) and name not in seen:
                self._config_error(peft_key, "target_parameters names it but the file has no tensors for it")
        if isinstance(self.config.target_modules, list):
            names = [self.peft_name(n) for n in list(self.targets) + list(self.untargetable)]
            for t in self.config.target_modules:
                hits = [n for n in names if n == t or n.endswith("." + t)]
                refused = [n for n in hits if self.model_name(n) in self.untargetable]
                if refused:
                    self._config_error(t, self.untargetable[self.model_name(refused[0])])
                elif t.rpartition(".")[2] in NOT_APPLIED:
                    self._config_error(t, NOT_APPLIED[t.rpartition(".")[2]])
                elif not hits and t not in ("in_proj_qkvz", "in_proj_ba"):
                    self._config_error(t, "target_modules names a module this model does not have (the vision tower is not served yet)")

    def _config_error(self, key: str, why: str) -> None:
        self.config_errors.append(TensorReport(key, [], error=why))


def _full_2d_shape(part: Part) -> tuple[int, int]:
    """[out, in] of the unsharded weight a 2D part stands for."""
    shape = part.full_shape()
    return shape[0], shape[1]

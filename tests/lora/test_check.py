"""`hylo check-adapter`: each tensor's layer, part and per-rank slice; non-zero exit on refusal."""

import json
import shutil

from hylo.cli import main
from tests.conftest import EXPERT_PARAMETERS, MOE, RANK, TEXT


def test_reports_each_ranks_slices(checkpoints, adapters, capsys):
    assert main(["check-adapter", checkpoints("moe"), adapters("moe", seed=80), "--tp", "4"]) == 0
    out = capsys.readouterr().out
    keys, values = TEXT["linear_num_key_heads"] * TEXT["linear_key_head_dim"], TEXT["linear_num_value_heads"] * TEXT["linear_value_head_dim"]
    q, v = keys // 4, values // 4  # rows of q (and of k), and of v, per rank
    assert f"base_model.model.model.layers.0.linear_attn.in_proj_qkv.lora_B.weight [{2 * keys + values}, {RANK}]" in out
    assert "→ layer model.layers.0.linear_attn.in_proj, part in_proj_qkv (module)" in out
    # in_proj_qkv's B splits q, k and v each by heads (k and v rows counted from the start of the fused B).
    assert f"rank 3: rows q {3 * q}:{keys}, k {keys + 3 * q}:{2 * keys}, v {2 * keys + 3 * v}:{2 * keys + values}" in out
    # A row-parallel part splits A's columns; B stays whole.
    assert f"rank 1: columns out_proj {v}:{2 * v}" in out
    # Two KV heads over four ranks: each head is replicated on two ranks.
    d = TEXT["head_dim"]
    assert f"rank 0: rows k_proj 0:{d}\n    rank 1: rows k_proj 0:{d}\n    rank 2: rows k_proj {d}:{2 * d}" in out
    # The shared expert's gate sits in the MoE block's fused projection, one row kept whole on every rank.
    gate_b = "base_model.model.model.layers.0.mlp.shared_expert_gate.lora_B.weight"
    assert f"{gate_b} [1, {RANK}]\n    → layer model.layers.0.mlp.in_proj, part shared_expert_gate (module)\n    whole on every rank" in out
    assert out.strip().endswith(f"max rank {RANK}")


def test_accepts_routed_expert_parameters_and_splits_each_by_its_own_dimension(checkpoints, adapters, capsys):
    """PEFT's target_parameters adapter on a MoE whose hidden size differs from the experts' intermediate size:
    gate_up_proj's B splits by rows ([gate | up], each by ranks), down_proj's A by columns, the other stays whole."""
    adapter = adapters("moe", seed=83, target_modules=None, target_parameters=EXPERT_PARAMETERS)
    assert main(["check-adapter", checkpoints("moe"), adapter, "--tp", "2"]) == 0
    out = capsys.readouterr().out
    e, i, h = MOE["num_experts"], MOE["moe_intermediate_size"], TEXT["hidden_size"]
    p = "base_model.model.model.layers.0.mlp.experts."
    gate_up_b = f"{p}base_layer.lora_B.weight [{2 * i}, {RANK * e}]\n    → layer model.layers.0.mlp.experts, part experts.gate_up_proj (parameter)"
    assert f"{gate_up_b}\n    rank 0: rows gate_proj 0:{i // 2}, up_proj {i}:{i + i // 2}\n    rank 1: rows gate_proj {i // 2}:{i}, up_proj {i + i // 2}:{2 * i}" in out
    assert f"{p}base_layer.lora_A.weight [{RANK * e}, {h}]\n    → layer model.layers.0.mlp.experts, part experts.gate_up_proj (parameter)\n    whole on every rank" in out
    down_a = f"{p}lora_A.weight [{RANK * e}, {i}]\n    → layer model.layers.0.mlp.experts, part experts.down_proj (parameter)"
    assert f"{down_a}\n    rank 0: columns down_proj 0:{i // 2}\n    rank 1: columns down_proj {i // 2}:{i}" in out
    assert f"{p}lora_B.weight [{h}, {RANK * e}]\n    → layer model.layers.0.mlp.experts, part experts.down_proj (parameter)\n    whole on every rank" in out
    assert out.strip().endswith(f"OK: {4 * TEXT['num_hidden_layers']} tensors, max rank {RANK}")


def test_refusal_exits_non_zero_with_the_reason(checkpoints, adapters, tmp_path, capsys):
    folder = tmp_path / "dora"
    shutil.copytree(adapters("dense", seed=81), folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = ["conv1d", "q_proj"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert main(["check-adapter", checkpoints("dense"), str(folder)]) == 1
    out = capsys.readouterr().out
    assert "REFUSED: hylo does not apply LoRA to the GDN conv1d" in out
    assert "target_modules does not cover it" in out


def test_a_size_that_does_not_split(checkpoints, adapters, capsys):
    assert main(["check-adapter", checkpoints("dense"), adapters("dense", seed=82), "--tp", "3"]) == 1
    assert "cannot be split over tensor_parallel_size=3" in capsys.readouterr().out

"""`hylo check-adapter`: each tensor's layer, part and per-rank slice; non-zero exit on refusal."""

import json
import shutil

from hylo.cli import main


def test_reports_each_ranks_slices(checkpoints, adapters, capsys):
    assert main(["check-adapter", checkpoints("moe"), adapters("moe", seed=80), "--tp", "4"]) == 0
    out = capsys.readouterr().out
    # in_proj_qkv's B splits q, k and v each by heads: 4 key heads × 8 = 32 q rows → 8 per rank.
    assert "base_model.model.model.layers.0.linear_attn.in_proj_qkv.lora_B.weight [128, 4]" in out
    assert "→ layer model.layers.0.linear_attn.in_proj, part in_proj_qkv (module)" in out
    assert "rank 3: rows q 24:32, k 56:64, v 112:128" in out
    # A row-parallel part splits A's columns; B stays whole.
    assert "rank 1: columns out_proj 16:32" in out
    # Two KV heads over four ranks: each head is replicated on two ranks.
    assert "rank 0: rows k_proj 0:16\n    rank 1: rows k_proj 0:16\n    rank 2: rows k_proj 16:32" in out
    assert out.strip().endswith("max rank 4")


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

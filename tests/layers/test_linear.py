"""Column layers: a fused GEMM whose output rows are padded for cuBLAS, while the declared parts stay exact."""

import torch
import torch.nn.functional as F

from hylo.distributed import TPGroup
from hylo.layers.linear import ROW_ALIGN, ColumnLinear, Proj
from hylo.layers.parts import whole


def test_a_column_layer_of_unaligned_rows_pads_its_gemm_but_declares_and_returns_only_its_rows():
    """MoE's router + shared expert gate + shared gate/up is such a layer (256 + 1 + 2 × 512 rows)."""
    torch.manual_seed(0)
    layer = ColumnLinear(12, [Proj("gate", (whole("gate", 6),), lora=False), Proj("shared_expert_gate", (whole("shared_expert_gate", 1),)),
                              Proj.plain("up", 6)], TPGroup())
    assert layer.weight.shape == (13, 12) and ROW_ALIGN == 8
    assert sum(p.target.narrow(0, p.offset, p.size).numel() for p in layer.parts()) == layer.weight.numel()
    layer.weight.normal_()
    for tokens in (5, 1):  # one token is a GEMV, run on the rows as they are
        x = torch.randn(tokens, 12)
        gate, shared_gate, up = layer(x)
        torch.testing.assert_close(torch.cat([gate, shared_gate, up], dim=-1), F.linear(x, layer.weight))
        assert gate.stride(0) == (16 if tokens > 1 else 13)  # rows of the padded GEMM's output, which cuBLAS writes aligned

"""fla-core's gated delta rule (GPU only) against the torch reference: ragged prefill and decode, fresh and continuing state."""

import importlib.util

import pytest
import torch

from hylo.batch import StepInput
from hylo.kernels import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("fla") is None, reason="needs CUDA and fla-core"),
]


def inputs(lengths, contexts, dtype, hk=4, hv=8, d=64):
    n = sum(lengths)
    dev = torch.device("cuda")
    q, k = torch.randn(n, hk, d, device=dev, dtype=dtype), torch.randn(n, hk, d, device=dev, dtype=dtype)
    v = torch.randn(n, hv, d, device=dev, dtype=dtype)
    a, b = torch.randn(n, hv, device=dev, dtype=dtype), torch.randn(n, hv, device=dev, dtype=dtype)
    a_log, dt_bias = torch.randn(hv, device=dev, dtype=dtype) * 0.5, torch.randn(hv, device=dev, dtype=dtype)
    m = len(lengths)
    step = StepInput([0] * n, [0] * n, list(lengths), list(contexts), torch.randperm(16)[:m].tolist(), [[0]] * m, [0] * n, [n - 1], [-1] * m)
    return (q, k, v, a, b, a_log, dt_bias), step.to_batch(dev)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 3e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("lengths, contexts", [([37, 1, 200, 64], [0, 5, 0, 12]), ([1, 1, 1], [3, 9, 40])], ids=["prefill", "decode"])
def test_fla_equals_reference(lengths, contexts, dtype, tol, monkeypatch):
    from hylo.kernels import gpu  # prefill: fla-core's chunked kernel (not the token-by-token one); decode: hylo's Triton step

    monkeypatch.setattr(gpu, "RECURRENT_PREFILL_TOKENS", 0)
    gated_delta_rule = gpu.gated_delta_rule
    torch.manual_seed(0)
    args, batch = inputs(lengths, contexts, dtype)
    states = torch.randn(16, 8, 64, 64, device="cuda") * 0.1
    ref_states = states.clone()
    got = gated_delta_rule(*args, states, batch)
    ref = reference.gated_delta_rule(*[a.float() for a in args], ref_states, batch)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    assert rel(got, ref) < tol
    assert rel(states, ref_states) < tol

"""The benchmark's MoE roofline: the experts a decode step touches, against a simulation of routing."""

import random

import pytest

from hylo.bench import touched_experts


@pytest.mark.parametrize("experts, top_k, tokens", [(256, 8, 1), (256, 8, 16), (256, 8, 64), (512, 10, 7), (10, 3, 40)])
def test_touched_experts_match_a_simulation_of_uniform_routing(experts, top_k, tokens):
    rng = random.Random(experts * tokens + top_k)
    trials = 2000
    simulated = sum(len({e for _ in range(tokens) for e in rng.sample(range(experts), top_k)}) for _ in range(trials)) / trials
    assert touched_experts(experts, top_k, tokens) == pytest.approx(simulated, rel=0.02)


def test_one_token_touches_top_k_and_many_touch_nearly_all():
    assert touched_experts(256, 8, 1) == pytest.approx(8)
    assert touched_experts(256, 8, 4096) == pytest.approx(256, rel=1e-6)
    counts = [touched_experts(256, 8, n) for n in range(1, 200)]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)

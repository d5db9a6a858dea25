"""The batched sampler's device path (sample_on_device), which async scheduling reads back a step late."""

import torch

from hylo.sampling import SampleInput, SamplingParams, sample_on_device


def inputs(*params: SamplingParams) -> list[SampleInput]:
    return [SampleInput(p, [1, 2], [3], 0) for p in params]


def test_greedy_rows_take_the_argmax_and_a_row_that_is_not_finite_is_flagged():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    logits[1, 7] = logits[1, 30] = 9.0  # a tie: the lower index, as torch's argmax
    logits[2, 3] = float("nan")
    logits[3, 11] = float("-inf")
    greedy = SamplingParams(temperature=0)
    both = sample_on_device(logits, inputs(*[greedy] * 4))
    assert both.dtype == torch.long and both.shape == (2, 4)
    assert both[0, 0] == logits[0].argmax() and both[0, 1] == 7
    assert both[1].tolist() == [1, 1, 0, 0]


def test_a_greedy_batch_gives_the_tokens_of_the_full_sampler():
    """The one-launch greedy path against the path every other batch takes (a row with a logit_bias sends the batch
    there): the same tokens for the greedy rows, and the bias applied to its own."""
    torch.manual_seed(1)
    logits = torch.randn(3, 64)
    greedy = SamplingParams(temperature=0)
    biased = SamplingParams(temperature=0, logit_bias={5: 100.0})
    fast = sample_on_device(logits, inputs(greedy, greedy, greedy))
    full = sample_on_device(logits, inputs(greedy, biased, greedy))
    assert fast[0, [0, 2]].tolist() == full[0, [0, 2]].tolist() == logits[[0, 2]].argmax(dim=-1).tolist()
    assert full[0, 1] == 5 and fast[0, 1] == logits[1].argmax()
    assert full[1].tolist() == fast[1].tolist() == [1, 1, 1]


def test_penalties_and_temperature_are_not_skipped_by_the_greedy_path():
    torch.manual_seed(2)
    logits = torch.randn(1, 40)
    top = int(logits.argmax())
    penalized = SamplingParams(temperature=0, repetition_penalty=50.0)
    row = SampleInput(penalized, [top], [], 0)  # the top token is in the prompt: the penalty pushes it down
    assert int(sample_on_device(logits, [row])[0, 0]) != top

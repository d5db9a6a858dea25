"""A step's inputs survive packing into the step channel's int64 array; the per-step metadata made from them."""

import torch

from hylo.batch import StepInput


def test_a_step_with_snapshot_copies_and_pending_tokens_packs_and_unpacks():
    step = StepInput([5, 6, 7], [16, 17, 0], [2, 1], [16, 0], [3, 1], [[4, 9], [2]], [144, 145, 32], [1, 2], [-1, 0],
                     snapshot_restores=[(11, 3)], snapshot_saves=[(3, 12), (1, 13)], pending=[(1, 2), (0, 0)])
    assert StepInput.unpack(step.pack()) == step
    plain = StepInput([1], [0], [1], [0], [0], [[0]], [0], [0], [-1])
    assert StepInput.unpack(plain.pack()) == plain


def test_gdn_chunk_indices_name_each_64_token_chunk_of_each_sequence():
    step = StepInput([0] * 394, [0] * 394, [37, 1, 200, 64, 65, 27], [0, 5, 0, 12, 0, 3], [0, 1, 2, 3, 4, 5], [[0]] * 6,
                     [0] * 394, [393], [-1] * 6)
    chunks = step.to_batch(torch.device("cpu")).gdn_chunk_indices
    assert chunks.tolist() == [[0, 0], [1, 0], [2, 0], [2, 1], [2, 2], [2, 3], [3, 0], [4, 0], [4, 1], [5, 0]]

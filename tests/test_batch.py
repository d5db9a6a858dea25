"""A step's inputs survive packing into the step channel's int64 array."""

from hylo.batch import StepInput


def test_a_step_with_snapshot_copies_and_pending_tokens_packs_and_unpacks():
    step = StepInput([5, 6, 7], [16, 17, 0], [2, 1], [16, 0], [3, 1], [[4, 9], [2]], [144, 145, 32], [1, 2], [-1, 0],
                     snapshot_restores=[(11, 3)], snapshot_saves=[(3, 12), (1, 13)], pending=[(1, 2), (0, 0)])
    assert StepInput.unpack(step.pack()) == step
    plain = StepInput([1], [0], [1], [0], [0], [[0]], [0], [0], [-1])
    assert StepInput.unpack(plain.pack()) == plain

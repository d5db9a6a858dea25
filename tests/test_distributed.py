"""The one-shot all-reduce is set up once per process: torch names every re-created default group "0", and a second
rendezvous under that name would go through the first group's dead store (it hung at TP=2 on GPUs)."""

import torch
import torch.distributed as dist

from hylo import distributed
from hylo.engine.executor import _free_port, _init_group


def _group() -> None:
    _init_group(0, 1, _free_port(), torch.device("cpu"))


def test_a_recreated_default_group_does_not_get_the_one_shot_all_reduce_again(monkeypatch):
    monkeypatch.setattr(distributed, "_rendezvoused", set())
    _group()
    try:
        assert distributed.can_enable_one_shot_all_reduce()
        distributed.enable_one_shot_all_reduce(torch.device("cpu"), 8, torch.float32, 16)  # no symmetric memory on the CPU: logged, NCCL's job
        assert distributed._one_shot is None
        assert not distributed.can_enable_one_shot_all_reduce()
    finally:
        dist.destroy_process_group()
    _group()  # the next engine in this process
    try:
        assert not distributed.can_enable_one_shot_all_reduce()
    finally:
        dist.destroy_process_group()

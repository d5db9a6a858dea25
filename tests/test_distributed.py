"""The one-shot all-reduce is set up once per process: torch names every re-created default group "0", and a second
rendezvous under that name would go through the first group's dead store (it hung at TP=2 on GPUs)."""

import socket

import torch
import torch.distributed as dist

from hylo import distributed


def _group() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def test_a_recreated_default_group_does_not_get_the_one_shot_all_reduce_again(monkeypatch):
    monkeypatch.setattr(distributed, "_rendezvoused", set())
    _group()
    try:
        assert distributed.can_enable_one_shot_all_reduce()
        distributed.enable_one_shot_all_reduce(torch.device("cpu"))  # no symmetric memory on the CPU: logged, NCCL's job
        assert distributed._one_shot is None
        assert not distributed.can_enable_one_shot_all_reduce()
    finally:
        dist.destroy_process_group()
    _group()  # the next engine in this process
    try:
        assert not distributed.can_enable_one_shot_all_reduce()
    finally:
        dist.destroy_process_group()

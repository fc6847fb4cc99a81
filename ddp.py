"""The torchrun process group, shared by train.py and evaluate.py: which process this is (rank,
world size) and its device. Without torchrun (no RANK in the environment) there is no group and
the process is rank 0 of 1.

    torchrun --nproc_per_node=8 train.py ...      # nccl on GPUs (one per process), gloo on CPUs
    torchrun --nproc_per_node=8 evaluate.py ...
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def master(self):
        return self.rank == 0


def setup_distributed(timeout=None):
    """The process group torchrun asks for (it sets RANK / LOCAL_RANK / WORLD_SIZE), else a single
    process. timeout (a timedelta): how long a collective may wait for the slowest rank; None keeps
    torch's default (10 minutes for nccl, 30 for gloo)."""
    if "RANK" not in os.environ:
        return Dist(device="cuda" if torch.cuda.is_available() else "cpu")
    rank, local, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    extra = {"timeout": timeout} if timeout is not None else {}
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", **extra)
        return Dist(rank, local, world, f"cuda:{local}")
    dist.init_process_group("gloo", **extra)
    return Dist(rank, local, world, "cpu")

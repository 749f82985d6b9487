"""Training on several processes (torchrun): who this process is, and the few points where processes meet.

Under torchrun every process runs the whole script; RANK, WORLD_SIZE and LOCAL_RANK in the environment
say which one it is. The processes join one group (NCCL between GPUs, gloo between CPUs); DDP averages
their gradients after each backward pass, and the few other meeting points are here.
"""
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from ..device import get_device


@dataclass
class TrainingProcess:
    """Where this process stands: its rank among `world_size` processes, and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @contextmanager
    def main_process_first(self):
        """The main process runs the block first (a download), then the others (reading it from disk)."""
        if not self.is_main:
            torch_dist.barrier()
        yield
        if self.is_main and self.world_size > 1:
            torch_dist.barrier()

    def wait_for_main_process(self):
        """Sync point, e.g. so that a checkpoint the main process writes is complete before others read it."""
        if self.world_size > 1:
            torch_dist.barrier()

    def all_reduce_sum(self, tensor):
        return self._all_reduce(tensor, torch_dist.ReduceOp.SUM)

    def all_reduce_max(self, tensor):
        return self._all_reduce(tensor, torch_dist.ReduceOp.MAX)

    def _all_reduce(self, tensor, op):
        if self.world_size > 1:
            torch_dist.all_reduce(tensor, op=op)
        return tensor


def join_processes(device_name=None):
    """This process, in the group of processes when started by torchrun (NCCL on GPUs, gloo on CPU)."""
    if "RANK" not in os.environ:
        return TrainingProcess(0, 1, get_device(device_name))
    device = get_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return TrainingProcess(torch_dist.get_rank(), torch_dist.get_world_size(), device)


def leave_processes():
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


"""DDP across the processes of a torchrun: each holds the whole model and trains on its share of each
batch (parallel.py says what a parallelism answers)."""
from contextlib import nullcontext

import torch
import torch.distributed as torch_dist

from .parallel import OneProcess


class DataParallel(OneProcess):
    """DDP: every process holds the whole model and trains on its share of each batch; the gradients are
    averaged across processes during the backward pass of a step's last micro-batch."""

    memory_strategy = "ddp"

    def prepare(self, model):
        model, training_model = super().prepare(model)
        device_ids = [self.process.device.index] if self.process.device.type == "cuda" else None
        return model, torch.nn.parallel.DistributedDataParallel(training_model, device_ids=device_ids)

    def gradient_sync(self, training_model, last):
        """Averaging after every micro-batch would send the gradients once per micro-batch for nothing."""
        return nullcontext() if last else training_model.no_sync()

    def sum(self, tensor):
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor

    def max(self, tensor):
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
        return tensor

    def evaluation_chunks(self, count):
        """Every world_size-th chunk, from this process's rank."""
        return [(index, True) for index in range(self.process.rank, count, self.process.world_size)]

"""Which samples each optimizer step trains on, the same whatever the number of processes.

`batch_size` is the global batch of one optimizer step. Each epoch is a permutation of the training set
drawn from the seed and the epoch number, cut into batches in order; each process takes every
world_size-th sample of a batch and, when its share is larger than a micro-batch, accumulates gradients
over micro-batches. So a step's samples depend only on the seed and the step number: resuming, or
running on another number of processes, trains on the same batches.
"""
import torch

from ..errors import UserError


class BatchPlan:
    def __init__(self, train_samples, batch_size, micro_batch_size, rank, world_size, seed):
        if batch_size % world_size:
            raise UserError(f"--batch-size {batch_size} must be a positive multiple of the number of processes ({world_size})")
        share = batch_size // world_size
        self.micro_batch = micro_batch_size or share
        if share % self.micro_batch:
            raise UserError(f"--micro-batch-size {self.micro_batch} must divide the {share} samples of each process's share")
        self.steps_per_epoch = train_samples // batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"the training set has {train_samples} samples, fewer than one batch of {batch_size}: "
                            "lower --batch-size or add data")
        self.accumulation = share // self.micro_batch  # micro-batches per step and process
        self.train_samples, self.batch_size, self.rank, self.world_size, self.seed = (
            train_samples, batch_size, rank, world_size, seed)
        self._epoch, self._permutation = None, None

    def micro_batches(self, step):
        """This process's sample indices for optimizer step `step`, one list per micro-batch."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._epoch != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._permutation, self._epoch = torch.randperm(self.train_samples, generator=generator), epoch
        batch = self._permutation[position * self.batch_size:(position + 1) * self.batch_size]
        share = batch[self.rank::self.world_size].tolist()
        return [share[start:start + self.micro_batch] for start in range(0, len(share), self.micro_batch)]

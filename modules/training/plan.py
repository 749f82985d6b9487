"""What each optimizer step trains on and at which learning rate, and how many steps a run has.

Everything here follows from the settings and the step number alone, so resuming at step n, or running
on another number of processes, trains on the same samples at the same learning rates.

Samples: `batch_size` is the global batch of one optimizer step. Each epoch is a permutation of the
training set drawn from the seed and the epoch number, cut into batches in order; each process takes every
world_size-th sample of a batch and, when its share is larger than a micro-batch, accumulates gradients
over micro-batches.

Learning rate: a linear warmup, then a cosine decay to a tenth of the peak at the last step (or constant).

Steps: the flags' --max-steps or --epochs; with --max-time, the steps that fit in the time, fixed before
the first step (the cosine schedule needs its end) and kept by --resume.
"""
import math

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


def learning_rate_factor(step, warmup_steps, total_steps, schedule="cosine", min_factor=0.1):
    """The share of the peak learning rate at `step`: a linear warmup to the peak (large early updates from
    random weights would be noisy), then for "cosine" a cosine decay to min_factor of it at the last step,
    for "constant" the peak until the end."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def default_warmup_steps(total_steps):
    """5% of the run, at least one step."""
    return max(1, total_steps // 20)


def steps_that_fit(seconds, step_seconds, evaluation_seconds, eval_interval, step_limit):
    """The optimizer steps whose training and evaluations fit in `seconds`: n steps take n * step_seconds
    plus an evaluation every eval_interval steps and one at the end; at most `step_limit`, at least 1."""
    per_step = step_seconds + evaluation_seconds / eval_interval
    return min(step_limit, max(1, math.floor((seconds - evaluation_seconds) / per_step)))

"""The schedule of a run: what each optimizer step trains on, at which learning rate, and how many steps fit.

Each step's samples and learning rate follow from the settings, the step number and the planned steps
(saved with the training state), so resuming at step n, or running on another number of processes,
trains on the same samples at the same learning rates.

Samples: `batch_size` is the global batch of one optimizer step. Each epoch is a permutation of the
training set drawn from the seed and the epoch number, cut into batches in order; each process takes every
world_size-th sample of a batch and, when its share is larger than a micro-batch, accumulates gradients
over micro-batches.

Learning rate: a linear warmup, then a cosine decay to a tenth of the peak at the last step (or constant).

Steps: the flags' --max-steps or --epochs; with --max-time, the steps that fit in the time left, planned
before the first step from a rehearsal and again every few steps from the pace of the latest ones
(TimeBudget), so that a run whose machine gets faster or slower mid-run still ends on time. The cosine
decay ends at the planned last step, wherever that moves; the warmup is fixed by the first plan.
"""
import math
import time

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


REPLAN_STEPS = 5  # --max-time: the steps that fit are planned again after this many steps
REHEARSALS = 3  # --max-time's first plan: a step timed this often; the first warms up


def rehearsed_pace(rehearse_step, sample, forward_passes, micro_batches):
    """(seconds per step, seconds per evaluation) for --max-time's first plan: `rehearse_step()` timed
    REHEARSALS times (the first warms up); an evaluation, its `forward_passes` at a third of a step's
    `micro_batches` each (the backward pass costs twice the forward) and the `sample()`, timed once."""
    timings = []
    for _ in range(REHEARSALS):
        started = time.perf_counter()
        rehearse_step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the GPU's work done, so that the time is the step's
        timings.append(time.perf_counter() - started)
    step_seconds = sum(timings[1:]) / len(timings[1:])
    started = time.perf_counter()
    sample()
    return step_seconds, forward_passes * step_seconds / micro_batches / 3 + time.perf_counter() - started


class TimeBudget:
    """--max-time: the steps that fit in `seconds` of training, evaluations included, planned again from
    the pace measured since the last plan. `clock` is time.perf_counter, or a test's own; `slowest` takes
    a list of floats and returns their maxima over all processes, so that every process plans the same."""

    def __init__(self, seconds, eval_interval, step_limit, seconds_used=0.0, evaluation_seconds=None,
                 clock=time.perf_counter, slowest=lambda values: values):
        self.seconds, self.eval_interval, self.step_limit = seconds, eval_interval, step_limit
        self.clock, self.slowest = clock, slowest
        self.started = clock() - seconds_used
        self.window_start, self.window_steps, self.window_evaluation_seconds = clock(), 0, 0.0
        self.evaluation_seconds = evaluation_seconds or 0.0  # unknown in a state saved before it was kept

    def seconds_used(self):
        return self.clock() - self.started

    def plan(self, step, step_seconds):
        """The number of steps of the whole run, `step` of them done: as many more as fit in the seconds left
        at this pace, with an evaluation every eval_interval steps and one at the end; the first plan has at
        least one step; at most step_limit."""
        step_seconds, evaluation_seconds, used = self.slowest([step_seconds, self.evaluation_seconds,
                                                              self.seconds_used()])
        self.evaluation_seconds = evaluation_seconds
        per_step = step_seconds + evaluation_seconds / self.eval_interval
        more = math.floor((self.seconds - used - evaluation_seconds) / per_step)
        return min(self.step_limit, step + max(more, 1 if step == 0 else 0))

    def evaluated(self, seconds):
        """An evaluation took `seconds`: the pace of the ones to come, and no part of the steps' pace."""
        self.evaluation_seconds = seconds
        self.window_evaluation_seconds += seconds

    def step_done(self, step, planned_steps):
        """After each step: every REPLAN_STEPS steps, and at the planned last one (more may fit: the run went
        faster than planned), the plan again at the pace of the steps since the last plan."""
        self.window_steps += 1
        if self.window_steps < REPLAN_STEPS and step < planned_steps:
            return planned_steps
        now = self.clock()
        step_seconds = (now - self.window_start - self.window_evaluation_seconds) / self.window_steps
        self.window_start, self.window_steps, self.window_evaluation_seconds = now, 0, 0.0
        return self.plan(step, step_seconds)

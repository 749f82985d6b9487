"""Evaluation: a task's metrics averaged over the first samples of a data set, the same samples whatever
the number of processes.

An evaluation takes the first `max_batches` batches of --batch-size samples (a number that does not depend
on the processes), cuts them into chunks of one micro-batch (what each process's memory was planned for),
and lets the run's parallelism (parallel.py) say which chunks each process runs. Each process adds up the
(sum, count) pairs of its chunks' metrics; the sums of all processes are added up, then divided.
"""
import math

import torch


@torch.no_grad()
def evaluate(task, model, dataset, samples, micro_batch, parallel, autocast, device):
    """{metric: mean} over the first `samples` samples of `dataset`, in chunks of `micro_batch`."""
    was_training = model.training
    model.eval()
    sums = {name: [0.0, 0] for name in task.metric_names}
    for chunk, counted in parallel.evaluation_chunks(math.ceil(samples / micro_batch)):
        start = chunk * micro_batch
        with autocast:  # every process runs its chunks, counted or not: FSDP's forward pass needs them all
            metrics = task.metrics(model, task.batch(dataset, range(start, min(samples, start + micro_batch)), device))
        if counted:
            for name, (total, count) in metrics.items():
                sums[name][0] += total
                sums[name][1] += count
    model.train(was_training)
    packed = parallel.sum(torch.tensor(list(sums.values()), dtype=torch.float64, device=device))
    return {name: (total / count if count else math.nan) for name, (total, count) in zip(sums, packed.tolist())}


def forward_passes(samples, micro_batch, parallel):
    """How many chunks of `samples` samples this process evaluates (counted or not)."""
    return len(parallel.evaluation_chunks(math.ceil(samples / micro_batch)))


def samples_evaluated(dataset, max_batches, batch_size):
    """The first `max_batches` batches of `batch_size` samples (all of `dataset` if None), at most all."""
    return len(dataset) if max_batches is None else min(len(dataset), max_batches * batch_size)

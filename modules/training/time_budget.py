"""--max-time: train for a given wall time, with the learning-rate schedule planned for the steps that fit.

The cosine schedule has to know the number of steps in advance. So before the first step, a rehearsal
times a few steps (forward and backward passes on real batches, but no update: the weights, the optimizer
and the random generators are left as they were) and one evaluation, and the plan is the number of steps
whose training and evaluations fit in the time. The plan is stored with the training state, so that
--resume continues the same schedule and repeats the losses of an uninterrupted run.
"""
import math
import time

import torch
from tqdm import tqdm

REHEARSAL_STEPS = 3  # the first one warms up (kernels chosen, memory allocated) and is not counted


def plan_steps(trainer, seconds):
    """The number of optimizer steps that `trainer` can run, evaluations included, in `seconds`; at most
    the steps its flags allow (--max-steps, --epochs)."""
    step_seconds, evaluation_seconds = _rehearse(trainer)
    # n steps take n * step_seconds, plus an evaluation every eval_interval steps and one at the end.
    per_step = step_seconds + evaluation_seconds / trainer.eval_interval
    fitting = max(1, math.floor((seconds - evaluation_seconds) / per_step))
    steps = min(fitting, trainer.step_limit)
    if trainer.process.is_main:
        tqdm.write(f"--max-time {seconds:g} s: a step takes {step_seconds:.3f} s and an evaluation {evaluation_seconds:.1f} s, "
                   f"so {steps:,} steps are planned")
    return steps


def _rehearse(trainer):
    """(seconds per step, seconds per evaluation), the same on every process."""
    cpu_random, cuda_random = torch.get_rng_state(), _cuda_random_state(trainer.process.device)
    timings = []
    for _ in range(REHEARSAL_STEPS):
        started = time.perf_counter()
        trainer.forward_backward(0)
        trainer.optimizer.zero_grad(set_to_none=True)
        _synchronize(trainer.process.device)
        timings.append(time.perf_counter() - started)
    started = time.perf_counter()
    trainer.evaluation()
    evaluation_seconds = time.perf_counter() - started
    torch.set_rng_state(cpu_random)
    if cuda_random is not None:
        torch.cuda.set_rng_state(cuda_random, trainer.process.device)
    # Every process plans the same steps, at the pace of the slowest: the others wait for it at each step,
    # and for the main process's sample at each evaluation.
    measured = torch.tensor([sum(timings[1:]) / len(timings[1:]), evaluation_seconds], dtype=torch.float64,
                            device=trainer.process.device)
    step_seconds, evaluation_seconds = trainer.process.all_reduce_max(measured).tolist()
    return step_seconds, evaluation_seconds


def _cuda_random_state(device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)

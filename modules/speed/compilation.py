"""torch.compile where it pays: the next-token cross-entropy of training, measured on this machine and
these shapes; the whole model only where asked (train.py --compile).

The loss of a language model is a softmax over the whole vocabulary at every position: for GPT-2's 50,257
tokens at 4 x 256 positions, 51 million exponentials forward and again backward, over logits too large
for any cache. PyTorch runs it as separate passes over memory (convert to float32, log-softmax, gather,
and backward: zeros, scatter, log-softmax's gradient); torch.compile fuses them. On a 2-core Intel Xeon
(AMX) the loss of 2,048 x 50,257 bfloat16 logits took 505 ms forward and backward, 155 ms compiled, and a
step of train.py's model (4 layers, 256 wide, batch 4 x 256) 261 ms against 207.

Compiling costs time at the start (COLD_COMPILE_SECONDS with empty caches) and needs a C++ compiler on
the CPU, so it is taken only where the time it is expected to save over the run's calls (SAVED_SHARE of
the eager time) exceeds that cost, and then only where measured faster.

Compiling the whole model fuses its element-wise work (GELU, dropout, residual additions) into the matrix
products around it. On a GPU that is where much of a step goes (nanoGPT's README: 250 to 135 ms an
iteration); on the CPU the step is its matrix products, and compiled it ran no faster (2 cores of an
Intel Xeon: 2,514 against 2,523 tokens/s, `python -m benchmarks.bench_training --size tiny [--compile]`).
So it is not measured but left to the user: --compile, for the GPU.
"""
import statistics
import time
from dataclasses import dataclass

import torch

MEASURED_CALLS = 3
# A first compile of the loss, forward and backward, with empty caches (a fresh TORCHINDUCTOR_CACHE_DIR):
# about 30 s on 2 quiet cores of an AMD EPYC (torch 2.13), 72 s on one core shared by a dozen processes; a
# few seconds once the caches hold it.
COLD_COMPILE_SECONDS = 30.0
# The share of the eager time that compiling saved: 69% on a 2-core Intel Xeon (above), 68% on AMD EPYC.
SAVED_SHARE = 0.6


@dataclass(frozen=True)
class LossChoice:
    """The loss function to train with, the seconds it saves a call against the eager one, and why."""

    function: object
    seconds_saved: float
    reason: str


def fastest_loss(loss_function, logits, targets, calls):
    """The LossChoice for `calls` calls of `loss_function(logits, targets)`, forward and backward, on
    tensors like these: its compiled form where that is expected to pay back its compile within the calls
    and is measured faster, else the function itself (also where compiling fails: no compiler, say)."""
    eager = _seconds(loss_function, logits, targets)
    expected = calls * eager * SAVED_SHARE
    if expected < COLD_COMPILE_SECONDS:
        return LossChoice(loss_function, 0.0, f"loss: eager, {eager * 1000:.0f} ms a call (compiled, {calls:,} "
                                              f"calls would save about {expected:.0f} s, less than a compile's "
                                              f"{COLD_COMPILE_SECONDS:.0f})")
    compiled = torch.compile(loss_function)
    started = time.perf_counter()
    try:
        compiled(logits.detach().requires_grad_(), targets).backward()  # the first call compiles
    except Exception as error:  # torch.compile raises many kinds of errors where it cannot run here
        return LossChoice(loss_function, 0.0, f"loss: eager (torch.compile cannot run here: {type(error).__name__})")
    compile_seconds = time.perf_counter() - started
    fast = _seconds(compiled, logits, targets)
    times = f"{fast * 1000:.0f} ms a call against {eager * 1000:.0f} eager; compiled in {compile_seconds:.0f} s"
    if fast < eager:
        return LossChoice(compiled, eager - fast, f"loss: compiled, {times}")
    return LossChoice(loss_function, 0.0, f"loss: eager, compiled it was no faster ({times})")


def _seconds(loss_function, logits, targets):
    times = []
    for _ in range(MEASURED_CALLS):
        inputs = logits.detach().requires_grad_()
        start = time.perf_counter()
        loss_function(inputs, targets).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compiled_model(model):
    """`model` under torch.compile (train.py --compile): the same parameters, a compiled forward pass."""
    return torch.compile(model)

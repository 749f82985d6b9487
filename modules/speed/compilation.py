"""torch.compile where it pays: the next-token cross-entropy of training, measured on this machine and
these shapes; the whole model only where asked (train.py --compile).

The loss of a language model is a softmax over the whole vocabulary at every position: for GPT-2's 50,257
tokens at 4 x 256 positions, 51 million exponentials forward and again backward, over logits too large
for any cache. PyTorch runs it as separate passes over memory (convert to float32, log-softmax, gather,
and backward: zeros, scatter, log-softmax's gradient); torch.compile fuses them. On a 2-core Intel Xeon
(AMX) the loss of 2,048 x 50,257 bfloat16 logits took 505 ms forward and backward, 155 ms compiled, and a
step of train.py's model (4 layers, 256 wide, batch 4 x 256) 261 ms against 207.

Compiling costs seconds at the start and needs a C++ compiler on the CPU, so it is taken only where it
is measured faster, and only for a loss slow enough (MIN_EAGER_SECONDS) that a run gains back the cost.

Compiling the whole model fuses its element-wise work (GELU, dropout, residual additions) into the matrix
products around it. On a GPU that is where much of a step goes (nanoGPT's README: 250 to 135 ms an
iteration); on the CPU the step is its matrix products, and compiled it ran no faster (2 cores of an
Intel Xeon: 2,514 against 2,523 tokens/s, `python -m benchmarks.bench_training --size tiny [--compile]`).
So it is not measured but left to the user: --compile, for the GPU.
"""
import statistics
import time

import torch

MIN_EAGER_SECONDS = 0.05
MEASURED_CALLS = 3


def fastest_loss(loss_function, logits, targets):
    """`loss_function(logits, targets)` or its compiled form, whichever computes forward and backward
    faster for tensors like these; the eager function where compiling fails (no compiler, say)."""
    eager = _seconds(loss_function, logits, targets)
    if eager < MIN_EAGER_SECONDS:
        return loss_function
    compiled = torch.compile(loss_function)
    try:
        compiled(logits.detach().requires_grad_(), targets).backward()  # the first call compiles
    except Exception:  # torch.compile raises many kinds of errors where it cannot run here
        return loss_function
    return compiled if _seconds(compiled, logits, targets) < eager else loss_function


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

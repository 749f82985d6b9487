"""For generation on the CPU: the faster of two kernels for the model's linear layers, measured here.

Generating a token multiplies one vector per sequence by every weight matrix of the model, so its speed
is the speed at which the weights stream from memory, and that depends on how the kernel spreads the
work over the cores. Which kernel streams faster depends on the CPU (2 cores each, GPT-2 124M):

- AMD EPYC (AVX2): PyTorch's default (MKL) ran such products on one core, oneDNN's kernel (the one
  torch.compile uses for linear layers on CPU) on both: 25 against 15 GB/s, generation 2x faster.
- Intel Xeon with AMX: MKL was the faster one (168 against 203 us for 768 x 2304, 201 against 313 us
  for 3072 x 768); with oneDNN, generation lost a fifth of its speed.

So nothing is assumed: the first time a weight shape meets a number of rows (rounded up to a power of
two), both kernels run on that input a few times and the faster is kept for the rest of the process.
A product that takes longer than MAX_MEASURED_SECONDS is computing, not streaming, and keeps PyTorch's
kernel without a measurement, so that measuring stays short. oneDNN's kernel has no backward pass, so
with gradients (training) F.linear always runs.
"""
import statistics
import threading
import time

import torch
from torch import nn
from torch.nn import functional as F

ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
MAX_MEASURED_SECONDS = 0.02
MEASURED_CALLS = 4  # per kernel, after one warm-up call each

_fastest = {}  # (out, in, dtype, has bias, rows bucket, threads) -> kernel
_measuring = threading.Lock()


def onednn_linear(x, weight, bias):
    """F.linear computed by oneDNN (equal up to float rounding)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class MeasuredLinear(nn.Linear):
    """nn.Linear whose forward, without gradients on the CPU, runs the kernel measured fastest for its shape."""

    def forward(self, x):
        if torch.is_grad_enabled() or x.device.type != "cpu" or not ONEDNN_AVAILABLE:
            return F.linear(x, self.weight, self.bias)
        return fastest_kernel(x, self.weight, self.bias)(x, self.weight, self.bias)


def use_fastest_linear_kernels(model):
    """Turn the nn.Linear layers of `model` into MeasuredLinear (same parameters, in place); returns it.

    For the code paths that generate (the app, evaluate_responses.py, get_gpt_weights.py's sample, the
    benchmarks). Training is unaffected: with gradients MeasuredLinear is nn.Linear."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = MeasuredLinear
    return model


def fastest_kernel(x, weight, bias):
    """F.linear or onednn_linear, whichever computed products of this shape faster on this machine."""
    rows = x.numel() // x.shape[-1]
    key = (*weight.shape, weight.dtype, bias is not None, 1 << (rows - 1).bit_length(), torch.get_num_threads())
    kernel = _fastest.get(key)
    if kernel is None:
        with _measuring:  # one measurement at a time: two at once would slow each other down
            kernel = _fastest.get(key) or _measure(x, weight, bias, (F.linear, onednn_linear))
            _fastest[key] = kernel
    return kernel


def _measure(x, weight, bias, candidates):
    """The fastest of `candidates` (kernels like F.linear) on this input; the first is the default."""
    default = candidates[0]
    start = time.perf_counter()
    default(x, weight, bias)
    if time.perf_counter() - start > MAX_MEASURED_SECONDS:
        return default
    for kernel in candidates[1:]:
        kernel(x, weight, bias)  # a first call may prepare the kernel (oneDNN builds a plan for the shape)
    seconds = {kernel: [] for kernel in candidates}
    for _ in range(MEASURED_CALLS):
        for kernel, times in seconds.items():  # alternating, so a machine getting busier slows all alike
            start = time.perf_counter()
            kernel(x, weight, bias)
            times.append(time.perf_counter() - start)
    return min(candidates, key=lambda kernel: statistics.median(seconds[kernel]))

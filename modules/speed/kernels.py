"""For generation on the CPU: the fastest of a few kernels for each of the model's linear layers, measured here.

Generating a token multiplies one vector per sequence by every weight matrix of the model, so its speed
is the speed at which the weights stream from memory, and that depends on the kernel. Which kernel is
fastest depends on the CPU and the dtype (2 cores each, GPT-2 124M, batch 1):

- AMD EPYC (AVX2), float32: PyTorch's default (MKL) ran such products on one core, oneDNN's kernel on
  both: 25 against 15 GB/s, generation 2x faster.
- Intel Xeon with AMX, float32: MKL was the fastest (180 against 230 to 240 us for 768 x 2304).
- The same Xeon, bfloat16: oneDNN with its weights reordered once into its own blocked layout ("packed",
  as torch.compile's freezing does) took 113 us for 768 x 2304 against 181 for PyTorch's default, which
  converts the weights at every call; generation ran at 18 instead of 23.5 ms per token.

The packed copy doubles the memory of the weights, and it is there to skip a conversion that float32
weights never need, so it is measured for other dtypes only. (In float32 on the Xeon it won only for the
prompt's rows, which run once per generation, and raised the peak memory of generating with GPT-2 124M
from 847 to 1,104 MiB.)

So nothing is assumed: the first time a weight shape meets a number of rows (rounded up to a power of
two), each kernel runs a few times on that input and the fastest is kept for the rest of the process. A
product that takes longer than MAX_MEASURED_SECONDS is computing, not streaming, and keeps PyTorch's
kernel without a measurement, so that measuring stays short. oneDNN's kernels have no backward pass, so
with gradients (training) F.linear always runs, and so it does in a graph torch.compile traces (the
compiled decoding step of modules/speed/compiled_generation.py).
"""
import statistics
import threading
import time

import torch
from torch import nn
from torch.nn import functional as F

ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
MAX_MEASURED_SECONDS = 0.02
MEASURED_CALLS = 8  # per kernel, after one warm-up call each

_fastest = {}  # (out, in, dtype, has bias, rows bucket, threads) -> kernel
_measuring = threading.Lock()


def pytorch_linear(layer, x):
    """PyTorch's own kernel (MKL on x86 CPUs)."""
    return F.linear(x, layer.weight, layer.bias)


def onednn_linear(layer, x):
    """oneDNN's kernel on the weight as it is (equal to F.linear up to float rounding)."""
    return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")


def onednn_packed_linear(layer, x):
    """oneDNN's kernel on a copy of the weight reordered once into oneDNN's blocked layout: more memory
    (the copy), no conversion at each call (MeasuredLinear.packed_weight)."""
    return torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight(x.numel() // x.shape[-1]), layer.bias, "none", [], "")


def pytorch_matrix_vector(layer, x):
    """For a single row: PyTorch's matrix-vector product (addmv), which skips the matrix-matrix machinery."""
    vector = x.reshape(-1)
    product = torch.mv(layer.weight, vector) if layer.bias is None else torch.addmv(layer.bias, layer.weight, vector)
    return product.view(*x.shape[:-1], -1)


def candidate_kernels(weight, rows):
    """The kernels worth measuring for this weight and number of rows; the first is the default."""
    kernels = [pytorch_linear, onednn_linear]
    if weight.dtype != torch.float32:
        kernels.append(onednn_packed_linear)
    if rows == 1:
        kernels.append(pytorch_matrix_vector)
    return kernels


class MeasuredLinear(nn.Linear):
    """An nn.Linear's own weight and bias (the same Parameters, so tied weights stay tied), whose forward,
    without gradients on the CPU, runs the kernel measured fastest for its shape."""

    def __init__(self, linear):
        nn.Module.__init__(self)  # not nn.Linear's, which would make and initialise new weights
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_parameter("weight", linear.weight)
        self.register_parameter("bias", linear.bias)
        self.packed, self.packed_version = None, None

    def forward(self, x):
        if torch.is_grad_enabled() or x.device.type != "cpu" or not ONEDNN_AVAILABLE or torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)  # under torch.compile the compiler picks the kernel
        return fastest_kernel(self, x)(self, x)

    def packed_weight(self, rows):
        """The weight in oneDNN's blocked layout for products of `rows` rows, made again when the weight
        changed (load_state_dict, merge_lora after a first generation)."""
        if self.packed_version != self.weight._version:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), rows)
            self.packed_version = self.weight._version
        return self.packed

    def drop_packed_weight(self):
        self.packed, self.packed_version = None, None


def use_fastest_linear_kernels(model):
    """Put a MeasuredLinear around each nn.Linear of `model` (in place, the same parameters); returns it.

    For the code paths that generate (modules.speed.prepare_for_generation). Training is unaffected:
    with gradients MeasuredLinear is nn.Linear."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                parent.register_module(name, MeasuredLinear(child))
    return model


def fastest_kernel(layer, x):
    """The kernel that computed products of this shape fastest on this machine (measured at first use)."""
    rows = x.numel() // x.shape[-1]
    weight = layer.weight
    key = (*weight.shape, weight.dtype, layer.bias is not None, 1 << (rows - 1).bit_length(), torch.get_num_threads())
    kernel = _fastest.get(key)
    if kernel is None:
        with _measuring:  # one measurement at a time: two at once would slow each other down
            kernel = _fastest.get(key)
            if kernel is None:
                kernel = _fastest[key] = _measure(layer, x, candidate_kernels(weight, rows))
                if kernel is not onednn_packed_linear:
                    layer.drop_packed_weight()  # the measurement's copy, not needed
    return kernel


def _measure(layer, x, candidates):
    """The fastest of `candidates` (kernels like pytorch_linear) on this input; the first is the default."""
    default = candidates[0]
    start = time.perf_counter()
    default(layer, x)
    if time.perf_counter() - start > MAX_MEASURED_SECONDS:
        return default
    for kernel in candidates[1:]:
        kernel(layer, x)  # a first call may prepare the kernel (oneDNN builds a plan, packs the weight)
    seconds = {kernel: [] for kernel in candidates}
    for _ in range(MEASURED_CALLS):
        for kernel, times in seconds.items():  # alternating, so a machine getting busier slows all alike
            start = time.perf_counter()
            kernel(layer, x)
            times.append(time.perf_counter() - start)
    return min(candidates, key=lambda kernel: statistics.median(seconds[kernel]))

"""Precision, decided here: what each --dtype means, what auto picks on this machine, and how training runs it.

bfloat16 where the machine computes it natively, float32 elsewhere: that is what --dtype auto means.

bfloat16 keeps float32's range with fewer digits (8 bits of mantissa, about 3 significant digits): enough
for the matrix products of training and generation, and half the bytes. Whether it is faster depends on
the hardware. GPUs since Ampere compute it natively. On x86 CPUs, AMX (Intel Xeon 4th generation and
later) and AVX512-BF16 (Intel Cooper Lake, AMD Zen 4) do; on a 2-core Xeon with AMX a 4096 x 4096 matmul
ran at 2,059 GFLOP/s in bfloat16 against 348 in float32. Without these instructions, PyTorch's CPU kernels
convert to float32 and back, and bfloat16 is slower than float32 (e.g. AVX2-only AMD EPYC): float32 there.
"""
from contextlib import nullcontext
from functools import lru_cache

import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")  # --dtype of training

# The CPU flags (as Linux's /proc/cpuinfo names them) of instructions that multiply bfloat16 natively.
NATIVE_BF16_CPU_FLAGS = {"amx_bf16", "avx512_bf16", "bf16"}  # bf16: ARMv8.6's, in the "Features" line


@lru_cache(maxsize=1)
def cpu_flags():
    """The instruction sets of this CPU, as Linux's /proc/cpuinfo names them (elsewhere: none known)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next(line for line in cpuinfo if line.startswith(("flags", "Features")))  # x86, ARM
    except (OSError, StopIteration):
        return frozenset()
    return frozenset(line.split(":", 1)[1].split())


def cpu_has_native_bf16():
    """Whether this CPU has bfloat16 matrix instructions (False where unknown, the safe choice)."""
    return bool(NATIVE_BF16_CPU_FLAGS & cpu_flags()) and torch.backends.mkldnn.is_available()


def auto_dtype(device):
    """The dtype --dtype auto stands for on `device`: bfloat16 where it is computed natively, else float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


def resolve_dtype(name, device):
    """torch.dtype for a --dtype value ("auto", "float32", "bfloat16", "float16") on `device`."""
    return auto_dtype(device) if name == "auto" else getattr(torch, name)


def describe_precision(name, device):
    """One line for the user: the precision --dtype `name` runs in on `device`, and why for "auto"."""
    dtype = resolve_dtype(name, device)
    line = f"precision: {str(dtype).removeprefix('torch.')}"
    if name == "auto":
        native = dtype == torch.bfloat16
        line += f" (--dtype auto: {'bfloat16 is native' if native else 'no native bfloat16'} on this {torch.device(device).type})"
    return line


def mixed_precision(name, device):
    """(context for the forward pass, GradScaler or None) for training in --dtype `name`. Mixed precision
    runs the matrix products in 16 bits under autocast and keeps the weights and the loss in 32; float16
    needs a GradScaler on CUDA so that small gradients do not underflow to zero."""
    device = torch.device(device)
    dtype = resolve_dtype(name, device)
    if dtype == torch.float32:
        return nullcontext(), None
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" else None
    return torch.autocast(device.type, dtype=dtype), scaler

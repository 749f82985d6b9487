import ctypes
import sys

import torch

from .errors import UserError


def available_devices():
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.insert(0, "cuda")
    if torch.backends.mps.is_available():
        devices.insert(0, "mps")
    return devices


def get_device(name=None):
    """The torch.device to run on: `name` (e.g. "cuda", "cuda:1", "cpu"), or the best there is:
    cuda, then mps, then cpu."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name; this machine has: {', '.join(available_devices())}")
    if device.type not in available_devices():
        raise UserError(
            f"--device {name}: {device.type.upper()} is not available on this machine; "
            f"use one of: {', '.join(available_devices())}"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def keep_freed_memory():
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS (Linux only;
    elsewhere nothing happens). Returns whether the setting took.

    glibc serves every allocation over 32 MB with its own mmap and unmaps it when freed. A CPU training
    step of GPT-2 allocates gigabytes in such blocks (the logits of a batch alone are 411 MB at 8 x 256
    tokens), so every step the kernel hands out and zeroes fresh pages again: half a million page faults,
    a fifth of the step's time (more where page faults are slow, as in virtual machines). Serving them
    from the heap, which is never trimmed, reuses the same pages.
    PyTorch's CPU tuning guide gets the same effect by preloading jemalloc or tcmalloc; this needs no
    library. The cost: the process keeps its peak memory instead of returning it between steps, and
    the heap's fragments add to that peak (0.4 to 0.9 GB for GPT-2 124M at 8 x 256 tokens)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # a Linux without glibc, e.g. musl
        return False
    trim_threshold, mmap_max = -1, -4  # the M_* parameter numbers of <malloc.h>
    # As `man mallopt` says: no allocation served by mmap, and trimming the heap disabled completely.
    return libc.mallopt(mmap_max, 0) == 1 and libc.mallopt(trim_threshold, -1) == 1

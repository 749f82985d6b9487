"""How the learning rate changes over a run, and in which precision the forward pass runs."""
import math
from contextlib import nullcontext

import torch

from ..speed.precision import resolve_dtype


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


def autocast_context(dtype_name, device):
    """(context for the forward pass, GradScaler or None) for --dtype. Mixed precision runs the matrix
    products in 16 bits and keeps the weights and the loss in 32; float16 needs a GradScaler on CUDA so
    that small gradients do not underflow to zero. "auto": see modules/speed/precision.py."""
    dtype = resolve_dtype(dtype_name, device)
    if dtype == torch.float32:
        return nullcontext(), None
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" else None
    return torch.autocast(device.type, dtype=dtype), scaler

import torch

from .errors import UserError


def available_memory():
    """Bytes of memory the machine can give without swapping (Linux's MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


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

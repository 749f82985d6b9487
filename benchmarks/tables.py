"""The tables: one row per measurement, ours beside the reference with their ratio, under a line that says
where it ran (the CPU and its instruction sets, or the GPU; threads; library versions)."""
import os
import platform
import statistics
from dataclasses import dataclass, field

import torch


@dataclass
class Row:
    """One line of the results table. `ours` and `reference` hold every measurement; the table shows
    their medians, ratio = ours / reference, and the range of each side."""

    workload: str
    unit: str
    ours: list
    reference: list = field(default_factory=list)
    target: str = ""
    met: bool = None  # whether the target is reached; None when there is no target
    digits: int = 1

    def median(self, values):
        return statistics.median(values) if values else None

    @property
    def ratio(self):
        ours, reference = self.median(self.ours), self.median(self.reference)
        return ours / reference if ours is not None and reference else None

    def cells(self):
        def number(value):
            return "–" if value is None else f"{value:,.{self.digits}f}"

        def spread(values):
            return f"{number(min(values))}–{number(max(values))}" if len(values) > 1 else ""

        ranges = " / ".join(filter(None, (spread(self.ours), spread(self.reference))))
        ratio = "" if self.ratio is None else f"{self.ratio:.2f}x"
        return [self.workload, f"{number(self.median(self.ours))} {self.unit}",
                f"{number(self.median(self.reference))} {self.unit}" if self.reference else "–",
                ratio, ranges, self.target + {None: "", True: " (met)", False: " (MISSED)"}[self.met]]


TABLE_HEADER = ["workload", "ours", "reference", "ratio", "min–max (ours / ref)", "target"]


def markdown_table(rows):
    lines = [TABLE_HEADER] + [row.cells() for row in rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in [lines[0], ["---"] * len(TABLE_HEADER), *lines[1:]])


SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "bf16")


def speed_flags():
    """The instruction sets that decide PyTorch's CPU speed, among this CPU's."""
    from modules.speed.precision import cpu_flags

    return [flag for flag in SPEED_FLAGS if flag in cpu_flags()]


def cpu_name():
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_description(device, threads):
    """Where a benchmark ran: the CPU (model, cores, instruction sets) or GPU, threads, library versions."""
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {versions}"
    return (f"{cpu_name()}, {os.cpu_count()} cores ({' '.join(speed_flags()) or 'flags unknown'}), {threads} threads, "
            f"{versions}")

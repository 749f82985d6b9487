"""Measuring: wall time, memory, the machine's own limits, how busy other processes kept it, and the fresh
worker processes in which a side's peak memory is taken, or which stay to run one engine each.

Speeds are medians of several alternating runs; peak memory is taken in fresh processes, one per side,
because a process's peak RSS never goes down.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device):
    """(seconds, result) of one call, waiting for the GPU if there is one."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def _proc_status_bytes(field):
    """A memory figure of /proc/self/status (Linux) in bytes, or None where there is no /proc."""
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"


def peak_rss_bytes():
    """The most resident memory this process has held so far.

    On Linux, getrusage's ru_maxrss would be wrong for a worker: it survives exec, so a fresh process
    starts with the peak of the process that forked it. VmHWM belongs to the process's own memory."""
    peak = _proc_status_bytes("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    return peak


def current_rss_bytes():
    """The resident memory of this process now; without /proc, the peak so far, which right after the
    imports is the same thing."""
    return _proc_status_bytes("VmRSS") or peak_rss_bytes()


def peak_memory_bytes(device):
    """Peak RSS on the CPU; on a GPU the peak of memory allocated on it."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def matmul_peak_flops(device, size=4096, repeats=5, dtype=torch.float32):
    """FLOP/s of a size x size matmul in `dtype`: the practical peak of this device and thread count."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    timed(lambda: a @ b, device)  # warm-up
    seconds = statistics.median(timed(lambda: a @ b, device)[0] for _ in range(repeats))
    return 2 * size**3 / seconds


def memory_read_bandwidth(device, megabytes=1024, repeats=5):
    """Bytes/s at which the device reads memory: the faster of two reads of a tensor far larger than any
    cache, a sum and a matrix-vector product (how generation reads its weights). A model whose every step
    reads all its weights (generation at batch 1) can go no faster than this allows."""
    matrix = torch.ones(megabytes * 2**20 // 4 // 1024, 1024, device=device)
    vector = torch.ones(1024, device=device)
    seconds = []
    for read in (matrix.sum, lambda: matrix @ vector):
        timed(read, device)  # warm-up
        seconds.append(statistics.median(timed(read, device)[0] for _ in range(repeats)))
    return matrix.numel() * 4 / min(seconds)


class BackgroundLoad:
    """How busy other processes kept the CPUs while the benchmark ran (Linux; None elsewhere).

    With 2 cores, one busy core slows a multi-threaded kernel several times over (its threads wait for
    each other) and a single-threaded one hardly at all, so ratios from a busy machine can mislead.
    Use it as `with BackgroundLoad() as load: ...`, then read `load.fraction`."""

    fraction = None

    @staticmethod
    def _jiffies():
        """(busy CPU time of the machine, all CPU time, CPU time of this process and its finished workers)."""
        with open("/proc/stat") as stat:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
        with open("/proc/self/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        ours = sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
        busy = user + nice + system + irq + softirq + steal
        return busy, busy + idle + iowait, ours

    def __enter__(self):
        try:
            self._start = self._jiffies()
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exception):
        if self._start is not None:
            (busy, total, ours), (busy0, total0, ours0) = self._jiffies(), self._start
            self.fraction = max(0, (busy - busy0) - (ours - ours0)) / max(1, total - total0)

    def describe(self):
        if self.fraction is None:
            return ""
        return f"Other processes kept {self.fraction:.0%} of the CPUs busy meanwhile."


def run_worker(module, flags):
    """Run `python -m <module> --worker ... <flags>` (module: "benchmarks.bench_generation", ...) in a fresh
    process; its last stdout line is a JSON object, returned as a dict."""
    command = [sys.executable, "-m", module, *map(str, flags)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_workers(module, flag_lists, parallel=False):
    """run_worker for each list of flags: one after the other, or all at once with `parallel` (for
    --quick, where starting Python, torch and transformers takes longer than the work)."""
    if not parallel:
        return [run_worker(module, flags) for flags in flag_lists]
    with ThreadPoolExecutor(len(flag_lists)) as pool:
        return list(pool.map(lambda flags: run_worker(module, flags), flag_lists))


def report_from_worker(values):
    """The worker's side of run_worker: print its measurements as the last line of stdout."""
    print(json.dumps(values), flush=True)


class ResidentWorker:
    """A worker process that stays: `python -m <module> <flags>` started once, then asked for one run at a
    time (a JSON line each way; benchmarks.engines.WorkerChannel is its side), so that the timed runs of several workers, each
    with its own libraries and threads, can take turns in one benchmark.

    `ready` is the worker's first message, or None and `error` says why it is gone."""

    def __init__(self, module, flags, env=None):
        self.log = tempfile.TemporaryFile("w+")  # its stderr: a pipe nobody reads could fill and block it
        self.process = subprocess.Popen([sys.executable, "-m", module, *map(str, flags)], cwd=REPO, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                        env={**os.environ, **(env or {})})
        self.error = None
        self.ready = self.receive()
        if self.ready is not None and "error" in self.ready:
            self.error, self.ready = self.ready["error"], None
            self.close()

    def receive(self):
        """The worker's next message; None (and `error` set) when it died instead."""
        line = self.process.stdout.readline()
        if line:
            return json.loads(line)
        self.process.wait()
        self.log.seek(0)
        self.error = f"the worker process ended (exit status {self.process.returncode}): {last_line(self.log.read())}"
        return None

    def ask(self, request):
        """Send `request` (a dict); the worker's answer, or None when it died (see `error`)."""
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass
        return self.receive()

    def close(self):
        """End the worker: it stops when its stdin closes."""
        if self.process.stdin and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except BrokenPipeError:
                pass
        self.process.wait()
        self.log.close()


def last_line(text):
    """The last line of `text` that is not blank, at most 300 characters: a failed process's reason."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "nothing on stderr"

"""What the benchmarks share: the model pair, timing, memory, worker processes and the result table.

Every workload runs ours and a reference side by side on the same machine in the same run and reports
ratios, so a busy machine slows both sides alike. Speeds are medians of several alternating runs; peak
memory is taken in fresh processes, one per side, because a process's peak RSS never goes down.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# --quick: a model and workload small enough for CI, the same code paths as the real thing.
QUICK_CONFIG = {"vocab_size": 1000, "context_size": 128, "embedding_dim": 64, "num_heads": 4, "num_layers": 2,
                "drop_rate": 0.1, "qkv_bias": True}


def add_common_args(parser):
    parser.add_argument("--size", default="124M", help="a GPT_CONFIGS name (124M, 355M, ...) (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="CPU threads for both sides (default: all of this machine's, %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a tiny model and few steps (CI; numbers mean nothing)")


def benchmark_config(args):
    """The model config of a run: a GPT_CONFIGS size, or the tiny one of --quick."""
    from modules.config import resolve_config

    return dict(QUICK_CONFIG) if args.quick else resolve_config(args.size)


def setup(args):
    """Threads and device for this process (and, through the flags, for its workers)."""
    from modules.device import get_device

    torch.set_num_threads(args.threads)
    return get_device(args.device)


def common_flags(args):
    """The flags that a worker process needs to reproduce this process's set-up."""
    flags = ["--size", args.size, "--device", args.device, "--threads", str(args.threads), "--seed", str(args.seed)]
    return flags + (["--quick"] if args.quick else [])


# ----------------------------------------------------------------------------- models
def hf_config(config):
    """A transformers GPT2Config of the same shape as our config dict."""
    import transformers

    drop = config["drop_rate"]
    return transformers.GPT2Config(
        vocab_size=config["vocab_size"], n_positions=config["context_size"], n_embd=config["embedding_dim"],
        n_layer=config["num_layers"], n_head=config["num_heads"], resid_pdrop=drop, embd_pdrop=drop, attn_pdrop=drop,
        bos_token_id=config["vocab_size"] - 1, eos_token_id=config["vocab_size"] - 1,  # <|endoftext|> in GPT-2
    )


def reference_model(config, seed, device):
    """transformers' GPT2LMHeadModel with random weights drawn from `seed`."""
    import transformers

    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(hf_config(config)).to(device)


def ours_from_reference(hf_model, config):
    """Our GPTModel holding exactly the reference's weights (copies, so neither side shares memory)."""
    from modules.pretrained import convert_gpt2_weights, hf_name_to_gpt2
    from modules.speed import model_from_state_dict

    tensors = {hf_name_to_gpt2(name): tensor.detach().clone() for name, tensor in hf_model.state_dict().items()}
    return model_from_state_dict(config, convert_gpt2_weights(tensors))


def model_pair(config, seed, device):
    """(ours, reference) with the same random weights."""
    reference = reference_model(config, seed, device)
    return ours_from_reference(reference, config), reference


def one_side_model(side, config, seed, device):
    """The model of one side alone ("ours" or "reference"), for a fresh process that measures its memory:
    ours is built directly, not converted from a reference that would stay in memory."""
    if side == "reference":
        return reference_model(config, seed, device)
    from modules import GPTModel

    torch.manual_seed(seed)
    return GPTModel(config).to(device)


# ----------------------------------------------------------------------------- measuring
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


# ----------------------------------------------------------------------------- worker processes
def run_worker(script, flags):
    """Run `python benchmarks/<script> --worker ... <flags>` in a fresh process; its last stdout line is
    a JSON object, returned as a dict."""
    command = [sys.executable, str(REPO / "benchmarks" / script), *map(str, flags)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_workers(script, flag_lists, parallel=False):
    """run_worker for each list of flags: one after the other, or all at once with `parallel` (for
    --quick, where starting Python, torch and transformers takes longer than the work)."""
    if not parallel:
        return [run_worker(script, flags) for flags in flag_lists]
    with ThreadPoolExecutor(len(flag_lists)) as pool:
        return list(pool.map(lambda flags: run_worker(script, flags), flag_lists))


def report_from_worker(values):
    """The worker's side of run_worker: print its measurements as the last line of stdout."""
    print(json.dumps(values), flush=True)


# ----------------------------------------------------------------------------- results
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


def benchmark_main(parse_args, worker, run, title):
    """A benchmark script's main: a worker process does its part; otherwise run the benchmark and print its
    table under the machine's description and how busy the machine was."""
    args = parse_args()
    if args.worker:
        return worker(args)
    with BackgroundLoad() as load:
        rows = run(args)
    size = "quick" if args.quick else args.size
    print(f"\n{title}, {size} on {args.device}. {machine_description(setup(args), args.threads)}. {load.describe()}\n\n"
          f"{markdown_table(rows)}\n", flush=True)


SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "bf16")


def speed_flags():
    """The instruction sets that decide PyTorch's CPU speed, among this CPU's."""
    from modules.speed.precision import cpu_flags

    return [flag for flag in SPEED_FLAGS if flag in cpu_flags()]


def machine_description(device, threads):
    """Where a benchmark ran: the CPU (model, cores, instruction sets) or GPU, threads, library versions."""
    import platform

    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {versions}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores ({' '.join(speed_flags()) or 'flags unknown'}), {threads} threads, "
            f"{versions}")

"""W4, memory beyond one device: modules/training/memory_plan.py's plan, as a table for GPT-2's sizes on
24 GB GPUs, and against the peak memory of each process of a real sharded run on this machine.

    python -m benchmarks.bench_fsdp table                    # the plan: 124M-1558M, one and two 24 GB GPUs
    python -m benchmarks.bench_fsdp run --size 124M          # 2 FSDP processes (gloo): peak RSS vs the plan
    python -m benchmarks.bench_fsdp run --size 774M --context 64 --parallel ddp   # the plan's verdict first

A run trains a model of --size from random weights for a few steps of the training loop's pieces (FSDP2
per block and root, AdamW, bfloat16 where native, activation checkpointing with the flag), each process
in a fresh interpreter, and reports each process's peak RSS (VmHWM) beside its plan. A plan that does not
fit the RAM available stops the run before it allocates anything, as the training scripts do.
"""
import argparse
import os
import socket

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as multiprocessing

from benchmarks.measure import peak_rss_bytes
from benchmarks.tables import machine_description
from modules.checkpoint import empty_model
from modules.config import GPT_CONFIGS
from modules.errors import run_main
from modules.lora import apply_lora
from modules.model import GPTModel
from modules.speed.precision import mixed_precision, resolve_dtype
from modules.training.activation_checkpointing import checkpoint_activations
from modules.training.memory_plan import GB, RunShape, check_fits, memory_per_process, plan_memory
from modules.training.optimizer import make_optimizer
from modules.training.settings import PARALLEL_CHOICES
from modules.training.fsdp import shard_model

TABLE_SIZES = ("124M", "355M", "774M", "1558M")
GPU_BYTES = 24 * 2**30  # a "24 GB" GPU (RTX 3090, 4090, A10G...) holds 24 GiB
TABLE_COLUMNS = (  # (header, strategy, processes, activation checkpointing, LoRA rank)
    ("1 GPU", "one process", 1, False, None),
    ("1 GPU + AC", "one process", 1, True, None),
    ("1 GPU LoRA", "one process", 1, False, 16),
    ("2 GPUs DDP", "ddp", 2, False, None),
    ("2 GPUs DDP + AC", "ddp", 2, True, None),
    ("2 GPUs FSDP", "fsdp", 2, False, None),
    ("2 GPUs FSDP + AC", "fsdp", 2, True, None),
    ("2 GPUs FSDP LoRA", "fsdp", 2, False, 16),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    table = commands.add_parser("table", help="the memory plan of GPT-2's sizes on 24 GB GPUs, as Markdown")
    table.add_argument("--micro-batch-size", type=int, default=2)
    table.add_argument("--context", type=int, default=1024)
    run = commands.add_parser("run", help="a few training steps in several processes: peak RSS against the plan")
    run.add_argument("--size", default="124M", choices=list(GPT_CONFIGS))
    run.add_argument("--parallel", choices=PARALLEL_CHOICES, default="fsdp")
    run.add_argument("--processes", type=int, default=2)
    run.add_argument("--micro-batch-size", type=int, default=2)
    run.add_argument("--context", type=int, default=128)
    run.add_argument("--steps", type=int, default=2)
    run.add_argument("--activation-checkpointing", action="store_true")
    run.add_argument("--dtype", default="auto")
    return parser.parse_args(argv)


def meta_model(size, lora_rank=None):
    with torch.device("meta"):
        model = empty_model(GPT_CONFIGS[size])
        return apply_lora(model, lora_rank, lora_rank) if lora_rank else model


def memory_table(micro_batch, context):
    """Markdown: GB per process in bfloat16, with whether it fits a 24 GB GPU."""
    header = "| model | " + " | ".join(column[0] for column in TABLE_COLUMNS) + " |"
    lines = [header, "|" + " --- |" * (len(TABLE_COLUMNS) + 1)]
    for size in TABLE_SIZES:
        cells = []
        for _, strategy, processes, checkpointing, lora_rank in TABLE_COLUMNS:
            shape = RunShape(strategy, processes, micro_batch, context, 2, checkpointing, "cuda")
            total = plan_memory(meta_model(size, lora_rank), shape).total
            cells.append(f"{total / GB:.1f}" + (" ✓" if total <= GPU_BYTES else " ✗"))
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- a real run
def run_shape(args, device):
    strategy = args.parallel if args.processes > 1 else "one process"
    compute_bytes = resolve_dtype(args.dtype, device).itemsize
    return RunShape(strategy, args.processes, args.micro_batch_size, args.context, compute_bytes,
                    args.activation_checkpointing, device.type)


def _training_process(rank, port, args, results):
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.processes)
    torch.set_num_threads(max(1, os.cpu_count() // args.processes))
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = GPTModel({**GPT_CONFIGS[args.size], "context_size": args.context})
    if args.activation_checkpointing:
        checkpoint_activations(model)
    if args.parallel == "fsdp":
        training_model = shard_model(model, args.dtype, device)
    else:
        training_model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = make_optimizer(model, 1e-4, 0.1, device)
    autocast, _ = mixed_precision(args.dtype, device)
    for _ in range(args.steps):
        data = torch.randint(0, model.config["vocab_size"], (args.micro_batch_size, args.context + 1))
        with autocast:
            logits = training_model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), data[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    results[rank] = peak_rss_bytes()
    torch_dist.destroy_process_group()


def measured_run(args):
    """Each process's peak RSS in bytes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = multiprocessing.Manager().dict()
    multiprocessing.start_processes(_training_process, args=(port, args, results), nprocs=args.processes,
                                    start_method="spawn")
    return [results[rank] for rank in range(args.processes)]


def main(argv=None):
    args = parse_args(argv)
    if args.command == "table":
        print(f"GB per process, training in bfloat16 with AdamW, micro-batch {args.micro_batch_size} x {args.context} "
              f"tokens; ✓ fits a 24 GB GPU (24 GiB), ✗ does not. AC: activation checkpointing; LoRA: rank 16.\n")
        print(memory_table(args.micro_batch_size, args.context))
        return
    device = torch.device("cpu")
    print(machine_description(device, torch.get_num_threads()))
    shape = run_shape(args, device)
    available = memory_per_process(device, args.processes)
    plan = check_fits(meta_model(args.size), shape, available)  # a UserError, naming a fix, when it does not fit
    print(f"GPT-2 {args.size}: {plan.describe()}; {available / GB:.1f} GB of RAM available per process")
    peaks = measured_run(args)
    for rank, peak in enumerate(peaks):
        print(f"process {rank}: peak RSS {peak / GB:.2f} GB, planned {plan.total / GB:.2f} GB "
              f"({peak / plan.total:.2f} of the plan)")


if __name__ == "__main__":
    run_main(main)

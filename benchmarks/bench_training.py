"""W2, training: tokens per second of full training steps (forward, next-token cross-entropy, backward,
AdamW step), ours against transformers' GPT2LMHeadModel on the same weights, batch and optimizer in
float32, and, where the machine computes bfloat16 natively (what --dtype auto picks), ours under bfloat16
autocast against ours in float32; in one process, alternating step by step. Model FLOPs utilisation
against a matmul of the dtype the step ran in, timed by this script on the same threads; then the peak
memory of each side in a fresh process.

On the CPU, our training loop makes glibc keep freed memory (modules.speed.keep_freed_memory). That is
process-wide, so in the speed run it serves the reference as well; its fresh memory process runs
transformers as it ships, without it.

    python -m benchmarks.bench_training                    # 124M, batch 8 x 256 tokens
    python -m benchmarks.bench_training --size 355M --device cuda

FLOPs per token (PaLM appendix B, nanoGPT): 6 N + 12 L T d, with N the parameters that multiply
activations (all but the position embedding; the token embedding is also the output head), L layers,
T tokens per sequence, d the embedding size. 6 N is 2 N for the forward pass and 4 N for the backward
pass; 12 L T d is attention's two products (queries x keys, weights x values) over the full T x T square,
forward and backward.
"""
import copy
import statistics

import torch
from torch.nn import functional as F

from benchmarks.measure import matmul_peak_flops, peak_memory_bytes, report_from_worker, run_workers, timed
from benchmarks.reference import model_pair, one_side_model
from benchmarks.script import (
    benchmark_config, benchmark_main, benchmark_parser, common_flags, parse_with_quick_defaults, setup,
)
from benchmarks.tables import Row
from modules.errors import run_main
from modules.speed import auto_dtype, compiled_model, keep_freed_memory
from modules.speed.precision import mixed_precision
from modules.training.optimizer import make_optimizer

TARGET_MFU = 0.85  # float32
TARGET_LOW_PRECISION_SPEEDUP = 2.0  # bfloat16 autocast against float32, where bfloat16 is native


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument("--tokens", type=int, help="tokens per sequence (default: 256; 32 with --quick)")
    parser.add_argument("--steps", type=int, help="timed steps per side (default: 8; 2 with --quick)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps per side first (default: %(default)s)")
    parser.add_argument("--memory-steps", type=int, default=3,
                        help="steps of each fresh process that measures peak memory (default: %(default)s)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile our model (as train.py --compile does); the reference stays eager")
    return parse_with_quick_defaults(parser, argv, tokens=(256, 32), steps=(8, 2))


def flops_per_token(config, tokens):
    """Training FLOPs per token, the formula of this file's docstring."""
    from modules.checkpoint import empty_model

    model = empty_model(config)  # the parameters' shapes, nothing allocated
    multiplying = sum(p.numel() for p in model.parameters()) - model.position_embedding.weight.numel()
    return 6 * multiplying + 12 * config["num_layers"] * tokens * config["embedding_dim"]


def make_batch(config, args, device):
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, config["vocab_size"], (args.batch_size, args.tokens + 1), generator=generator).to(device)
    return ids[:, :-1], ids[:, 1:]


def next_token_loss(model, inputs, targets):
    """Cross-entropy of the next tokens in float32, computed alike for both sides. The logits (411 MB for
    GPT-2 at 8 x 256 tokens) die when this returns, before the backward pass, as in the training loop."""
    logits = model(inputs)
    logits = getattr(logits, "logits", logits)  # transformers returns an output object
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def make_step(model, device, inputs, targets, dtype_name="float32"):
    """A function running one training step of `model` with its own optimizer, as train.py builds it, its
    forward pass under the autocast of --dtype `dtype_name`."""
    model.train()
    optimizer = make_optimizer(model, lr=3e-4, weight_decay=0.1, device=device)
    autocast, _ = mixed_precision(dtype_name, device)

    def step():
        with autocast:
            loss = next_token_loss(model, inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def training_speeds(args, config, device, low_precision):
    """{side: [tokens/s per timed step]}, the sides alternating step by step: transformers and ours in
    float32, and ours in `low_precision` (None: not measured)."""
    if device.type == "cpu":
        keep_freed_memory()  # as the Trainer does
    ours, reference = model_pair(config, args.seed, device)
    ours_low = copy.deepcopy(ours) if low_precision else None
    if args.compile:  # a compiled model shares the parameters of the model it wraps
        ours = compiled_model(ours)
        ours_low = compiled_model(ours_low) if low_precision else None
    inputs, targets = make_batch(config, args, device)
    steps = {"reference": make_step(reference, device, inputs, targets), "ours": make_step(ours, device, inputs, targets)}
    if low_precision:
        steps["ours_low"] = make_step(ours_low, device, inputs, targets, low_precision)
    speeds = {side: [] for side in steps}
    for step_index in range(args.warmup_steps + args.steps):
        for side, step in steps.items():
            seconds, _ = timed(step, device)
            if step_index >= args.warmup_steps:
                speeds[side].append(inputs.numel() / seconds)
    return speeds


def worker(args):
    """One side alone in this fresh process: a few training steps, then the peak memory."""
    device = setup(args)
    config = benchmark_config(args)
    if args.worker == "ours" and device.type == "cpu":
        keep_freed_memory()  # as the Trainer does
    model = one_side_model(args.worker, config, args.seed, device)
    if args.worker == "ours" and args.compile:
        model = compiled_model(model)
    step = make_step(model, device, *make_batch(config, args, device), args.worker_dtype)
    for _ in range(args.memory_steps):
        step()
    report_from_worker({"peak_memory": peak_memory_bytes(device)})


def matmul_peaks(device, size, dtypes):
    """{dtype: FLOP/s of a size x size matmul}, the median of a measurement before and after the others."""
    return {dtype: statistics.median([matmul_peak_flops(device, size, dtype=dtype), matmul_peak_flops(device, size, dtype=dtype)])
            for dtype in dtypes}


def run(args):
    """The result rows of W2: ours against transformers in float32, and where the machine computes bfloat16
    natively (what --dtype auto picks), our bfloat16 autocast against our float32."""
    device = setup(args)
    config = benchmark_config(args)
    low = auto_dtype(device)
    low_precision = None if low == torch.float32 else str(low).removeprefix("torch.")
    matmul_size = 512 if args.quick else 4096
    speeds = training_speeds(args, config, device, low_precision)
    peaks = matmul_peaks(device, matmul_size, [torch.float32] + ([low] if low_precision else []))
    flops = flops_per_token(config, args.tokens)
    shape = f"batch {args.batch_size} x {args.tokens} tokens"
    shape += ", ours compiled" if args.compile else ""
    rows = [Row(f"W2 training step, float32, {shape}", "tokens/s", speeds["ours"], speeds["reference"],
                target=">= 1.0x")]
    rows[0].met = rows[0].ratio >= 1.0
    rows.append(mfu_row("float32", flops, peaks[torch.float32], speeds["ours"], speeds["reference"], TARGET_MFU))
    if low_precision:
        low_row = Row(f"W2 training step, {low_precision} autocast (--dtype auto) against our float32, {shape}",
                      "tokens/s", speeds["ours_low"], speeds["ours"], target=f">= {TARGET_LOW_PRECISION_SPEEDUP}x")
        low_row.met = low_row.ratio >= TARGET_LOW_PRECISION_SPEEDUP
        rows += [low_row, mfu_row(low_precision, flops, peaks[low], speeds["ours_low"], [])]
    sides = {"ours": "float32", "reference": "float32", **({"ours_low": low_precision} if low_precision else {})}
    memory = run_workers("benchmarks.bench_training", [["--worker", side.removesuffix("_low"), "--worker-dtype", dtype,
                                                *worker_flags(args)] for side, dtype in sides.items()],
                         parallel=args.quick)
    peak_memory = {side: result["peak_memory"] / 2**20 for side, result in zip(sides, memory)}
    rows.append(Row(f"W2 peak memory, float32, {shape} (fresh process)", "MiB", [peak_memory["ours"]],
                    [peak_memory["reference"]], target="<= 1.0x", digits=0))
    rows[-1].met = rows[-1].ratio <= 1.0
    if low_precision:
        rows.append(Row(f"W2 peak memory, {low_precision} autocast, against transformers' float32 (fresh process)",
                        "MiB", [peak_memory["ours_low"]], [peak_memory["reference"]], digits=0))
    return rows


def mfu_row(dtype_name, flops, peak, ours, reference, target=None):
    """Model FLOPs utilisation: tokens/s x FLOPs per token against the matmul peak of the dtype it ran in."""
    row = Row(f"W2 model FLOPs utilisation, {dtype_name} ({flops / 1e6:,.0f} MFLOP/token; {dtype_name} matmul peak "
              f"{peak / 1e9:,.1f} GFLOP/s)", "%", [100 * speed * flops / peak for speed in ours],
              [100 * speed * flops / peak for speed in reference])
    if target:
        row.target, row.met = f">= {target:.0%} (ours)", row.median(row.ours) >= 100 * target
    return row


def worker_flags(args):
    return [*common_flags(args), "--batch-size", str(args.batch_size), "--tokens", str(args.tokens),
            "--memory-steps", str(args.memory_steps), *(["--compile"] if args.compile else [])]


def main():
    benchmark_main(parse_args, worker, run, "Training")


if __name__ == "__main__":
    run_main(main)

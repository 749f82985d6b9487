"""W1, generation: new tokens per second of greedy decoding with a KV cache, ours against transformers'
GPT2LMHeadModel.generate on the same random weights, in one process, alternating; then the peak memory
of each side in a fresh process.

    python benchmarks/bench_generation.py                  # 124M, batch 1 and 8, 64-token prompts, 256 new tokens
    python benchmarks/bench_generation.py --size 355M --device cuda
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `modules`

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    benchmark_main, Row, add_common_args, benchmark_config, common_flags, memory_read_bandwidth, model_pair, peak_memory_bytes,
    one_side_model, report_from_worker, run_workers, setup, timed,
)
from modules.errors import run_main  # noqa: E402
from modules.generation import generate  # noqa: E402
from modules.speed import use_fastest_linear_kernels  # noqa: E402

TARGET_SPEEDUP = 1.5  # batch 1, against transformers


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="(default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (default: 64; 8 with --quick)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default: 256; 16 with --quick)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side; the median counts (default: %(default)s)")
    parser.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.prompt_tokens = args.prompt_tokens or (8 if args.quick else 64)
    args.new_tokens = args.new_tokens or (16 if args.quick else 256)
    return args


def make_prompt(config, batch_size, args, device):
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, config["vocab_size"], (batch_size, args.prompt_tokens), generator=generator).to(device)


def generator_of(side, model):
    """A function (prompt, new tokens) -> ids doing greedy decoding with a KV cache on `model`."""
    model.eval()
    if side == "ours":
        use_fastest_linear_kernels(model)  # as the generation entry points do
        return lambda prompt, new_tokens: generate(model, prompt, new_tokens)
    # Random weights may produce <|endoftext|>; like ours, the reference must not stop there.
    model.generation_config.eos_token_id = None
    return lambda prompt, new_tokens: model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False, use_cache=True,
        pad_token_id=0)


def generation_speeds(args, config, device, batch_size, sides):
    """{side: [new tokens/s per run]} and whether both sides produced the same tokens."""
    prompt = make_prompt(config, batch_size, args, device)
    for run in sides.values():
        run(prompt, 4)  # warm-up: first calls allocate and pick kernels
    speeds, outputs = {side: [] for side in sides}, {}
    for _ in range(args.repeats):
        for side, run in sides.items():
            seconds, outputs[side] = timed(lambda: run(prompt, args.new_tokens), device)
            speeds[side].append(batch_size * args.new_tokens / seconds)
    return speeds, torch.equal(outputs["ours"], outputs["reference"])


def bandwidth_row(model, speeds, device, args):
    """At batch 1 each new token reads every weight once: tokens/s x weight bytes is the bandwidth each
    side gets out of memory, against what the machine can read."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # the tied head once
    weight_bytes -= model.position_embedding.weight.nbytes  # a token reads one row of it
    bandwidth = memory_read_bandwidth(device, megabytes=64 if args.quick else 1024)
    return Row(f"W1 batch 1: weights read per second ({weight_bytes / 1e6:,.0f} MB a token; this machine reads "
               f"{bandwidth / 1e9:,.1f} GB/s)", "GB/s", [speed * weight_bytes / 1e9 for speed in speeds["ours"]],
               [speed * weight_bytes / 1e9 for speed in speeds["reference"]])


def worker(args):
    """One side alone in this fresh process: generate at batch 1 and report the peak memory."""
    device = setup(args)
    config = benchmark_config(args)
    model = one_side_model(args.worker, config, args.seed, device)
    generator_of(args.worker, model)(make_prompt(config, 1, args, device), args.new_tokens)
    report_from_worker({"peak_memory": peak_memory_bytes(device)})


def run(args):
    """The result rows of W1."""
    import transformers

    transformers.logging.set_verbosity_error()
    device = setup(args)
    config = benchmark_config(args)
    ours, reference = model_pair(config, args.seed, device)
    sides = {"reference": generator_of("reference", reference), "ours": generator_of("ours", ours)}
    shape = f"{args.prompt_tokens}+{args.new_tokens} tokens"
    rows = []
    for batch_size in args.batch_sizes:
        speeds, identical = generation_speeds(args, config, device, batch_size, sides)
        row = Row(f"W1 generation, batch {batch_size}, {shape}, greedy tokens {'identical' if identical else 'DIFFER'}",
                  "new tokens/s", speeds["ours"], speeds["reference"])
        rows.append(row)
        if batch_size == 1:
            row.target = f">= {TARGET_SPEEDUP}x, identical tokens"
            row.met = identical and row.ratio >= TARGET_SPEEDUP
            rows.append(bandwidth_row(ours, speeds, device, args))
    ours_memory, reference_memory = (
        result["peak_memory"] / 2**20 for result in run_workers(
            "bench_generation.py", [["--worker", side, *worker_flags(args)] for side in ("ours", "reference")],
            parallel=args.quick))
    rows.append(Row(f"W1 peak memory, batch 1, {shape} (fresh process)", "MiB", [ours_memory], [reference_memory],
                    digits=0))
    return rows


def worker_flags(args):
    return [*common_flags(args), "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]


def main():
    benchmark_main(parse_args, worker, run, "Generation")


if __name__ == "__main__":
    run_main(main)

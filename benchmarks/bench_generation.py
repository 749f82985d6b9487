"""W1, generation: new tokens per second of greedy decoding with a KV cache, ours against transformers'
GPT2LMHeadModel.generate on the same random weights, in one process, alternating; then the peak memory
of each side in a fresh process.

    python -m benchmarks.bench_generation                  # 124M, batch 1 and 8, 64-token prompts, 256 new tokens
    python -m benchmarks.bench_generation --size 355M --device cuda
"""
import copy

import torch

from benchmarks.measure import memory_read_bandwidth, peak_memory_bytes, report_from_worker, run_workers, timed
from benchmarks.reference import model_pair, one_side_model
from benchmarks.script import (
    benchmark_config, benchmark_main, benchmark_parser, common_flags, parse_with_quick_defaults, setup,
)
from benchmarks.tables import Row
from modules.errors import run_main
from modules.generation import generate
from modules.speed import auto_dtype, prepare_for_generation

TARGET_SPEEDUP = 1.5  # float32, batch 1, against transformers
TARGET_BF16_SPEEDUP = 2.0  # bfloat16 (where native), batch 1, against transformers in float32
TARGET_SHARE_OF_BOUND = 0.7  # float32, batch 1


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="(default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, help="prompt length (default: 64; 8 with --quick)")
    parser.add_argument("--new-tokens", type=int, help="tokens to generate (default: 256; 16 with --quick)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side; the median counts (default: %(default)s)")
    return parse_with_quick_defaults(parser, argv, prompt_tokens=(64, 8), new_tokens=(256, 16))


def make_prompt(config, batch_size, args, device):
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, config["vocab_size"], (batch_size, args.prompt_tokens), generator=generator).to(device)


def generator_of(side, model, dtype_name="float32"):
    """A function (prompt, new tokens) -> ids doing greedy decoding with a KV cache on `model`; ours is
    prepared as the generating scripts prepare it for --dtype `dtype_name`."""
    model.eval()
    if side == "ours":
        prepare_for_generation(model, dtype_name)
        return lambda prompt, new_tokens: generate(model, prompt, new_tokens)
    # Random weights may produce <|endoftext|>; like ours, the reference must not stop there.
    model.generation_config.eos_token_id = None
    return lambda prompt, new_tokens: model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False, use_cache=True,
        pad_token_id=0)


def generation_speeds(args, config, device, batch_size, sides):
    """({side: [new tokens/s per run]}, {side: the last run's new tokens}), the sides alternating."""
    prompt = make_prompt(config, batch_size, args, device)
    for run in sides.values():
        run(prompt, 4)  # warm-up: first calls allocate and pick kernels
    speeds, outputs = {side: [] for side in sides}, {}
    for _ in range(args.repeats):
        for side, run in sides.items():
            seconds, output = timed(lambda: run(prompt, args.new_tokens), device)
            speeds[side].append(batch_size * args.new_tokens / seconds)
            outputs[side] = output[:, args.prompt_tokens:]
    return speeds, outputs


def weight_bytes(model):
    """The bytes of weights a generated token reads: all, the tied head once, one row of the positions."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) - model.position_embedding.weight.nbytes


def bound_row(label, model, speeds, bandwidth, target=None):
    """At batch 1 each new token reads every weight once, so memory bounds the speed at bandwidth / weight
    bytes tokens per second: the share of that bound each side reaches."""
    bound = bandwidth / weight_bytes(model)
    row = Row(f"W1 batch 1, {label}: share of the memory bound ({weight_bytes(model) / 1e6:,.0f} MB a token at "
              f"{bandwidth / 1e9:,.1f} GB/s: {bound:,.1f} tokens/s)", "%",
              [100 * speed / bound for speed in speeds["ours"]],
              [100 * speed / bound for speed in speeds.get("reference", [])])
    if target:
        row.target, row.met = f">= {target:.0%} (ours)", row.median(row.ours) >= 100 * target
    return row


def worker(args):
    """One side alone in this fresh process: generate at batch 1 and report the peak memory."""
    device = setup(args)
    config = benchmark_config(args)
    model = one_side_model(args.worker, config, args.seed, device)
    generator_of(args.worker, model, args.worker_dtype)(make_prompt(config, 1, args, device), args.new_tokens)
    report_from_worker({"peak_memory": peak_memory_bytes(device)})


def run(args):
    """The result rows of W1: float32 against transformers, and where the machine computes bfloat16
    natively (what --dtype auto picks), bfloat16 against transformers in float32."""
    import transformers

    transformers.logging.set_verbosity_error()
    device = setup(args)
    config = benchmark_config(args)
    ours, reference = model_pair(config, args.seed, device)
    sides = {"reference": generator_of("reference", reference), "ours": generator_of("ours", ours)}
    low_precision = str(auto_dtype(device)).removeprefix("torch.")
    if low_precision != "float32":
        ours_low = copy.deepcopy(ours)
        sides["ours_low"] = generator_of("ours", ours_low, low_precision)
    bandwidth = memory_read_bandwidth(device, megabytes=64 if args.quick else 1024)
    shape = f"{args.prompt_tokens}+{args.new_tokens} tokens"
    rows = []
    for batch_size in args.batch_sizes:
        speeds, outputs = generation_speeds(args, config, device, batch_size, sides)
        identical = torch.equal(outputs["ours"], outputs["reference"])
        row = Row(f"W1 generation, float32, batch {batch_size}, {shape}, greedy tokens "
                  f"{'identical' if identical else 'DIFFER'}", "new tokens/s", speeds["ours"], speeds["reference"])
        rows.append(row)
        if batch_size == 1:
            row.target, row.met = f">= {TARGET_SPEEDUP}x, identical tokens", identical and row.ratio >= TARGET_SPEEDUP
            rows.append(bound_row("float32", ours, speeds, bandwidth, TARGET_SHARE_OF_BOUND))
        if "ours_low" in sides:
            same = (outputs["ours_low"] == outputs["ours"]).float().mean().item()
            low_row = Row(f"W1 generation, {low_precision} (--dtype auto) against transformers' float32, batch "
                          f"{batch_size}; greedy tokens {same:.0%} identical to our float32's", "new tokens/s",
                          speeds["ours_low"], speeds["reference"])
            rows.append(low_row)
            if batch_size == 1:
                low_row.target, low_row.met = f">= {TARGET_BF16_SPEEDUP}x", low_row.ratio >= TARGET_BF16_SPEEDUP
                rows.append(bound_row(low_precision, ours_low, {"ours": speeds["ours_low"]}, bandwidth))
    dtypes = {"ours": "float32", "reference": "float32", **({"ours_low": low_precision} if "ours_low" in sides else {})}
    memory = run_workers("benchmarks.bench_generation", [["--worker", side.removesuffix("_low"), "--worker-dtype", dtype,
                                                  *worker_flags(args)] for side, dtype in dtypes.items()],
                         parallel=args.quick)
    peaks = {side: result["peak_memory"] / 2**20 for side, result in zip(dtypes, memory)}
    rows.append(Row(f"W1 peak memory, float32, batch 1, {shape} (fresh process)", "MiB", [peaks["ours"]],
                    [peaks["reference"]], digits=0))
    if "ours_low" in peaks:
        rows.append(Row(f"W1 peak memory, {low_precision}, batch 1 (fresh process), against transformers' float32",
                        "MiB", [peaks["ours_low"]], [peaks["reference"]], digits=0))
    return rows


def worker_flags(args):
    return [*common_flags(args), "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]


def main():
    benchmark_main(parse_args, worker, run, "Generation")


if __name__ == "__main__":
    run_main(main)

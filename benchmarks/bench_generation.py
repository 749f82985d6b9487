"""W1, generation: new tokens per second of greedy decoding with a KV cache, ours against transformers'
GPT2LMHeadModel.generate on the same random weights, in one process, alternating; then the peak memory
of each side in a fresh process. Ours runs as the generating scripts run it, eager and with the decoding
step compiled (--compile, modules/speed/compiled_generation.py), in float32, in bfloat16 where it is
native, in int8 (compiled only: eager, int8 converts every matrix at every step).

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
from modules.speed import auto_dtype, decoder_for, prepare_for_generation

TARGET_SPEEDUP = 1.5  # float32, batch 1, against transformers
TARGET_BF16_SPEEDUP = 2.0  # bfloat16 (where native), batch 1, against transformers in float32
TARGET_SHARE_OF_BOUND = 0.7  # float32, batch 1


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="(default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, help="prompt length (default: 64; 8 with --quick)")
    parser.add_argument("--new-tokens", type=int, help="tokens to generate (default: 256; 16 with --quick)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side; the median counts (default: %(default)s)")
    parser.add_argument("--paths", nargs="+", choices=("eager", "compiled"),
                        help="our decoding step eager, compiled or both (default: both; eager with --quick, "
                             "where compiling would take longer than everything else)")
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16", "int8"),
                        help="our dtypes (default: float32, bfloat16 where native, int8)")
    args = parse_with_quick_defaults(parser, argv, prompt_tokens=(64, 8), new_tokens=(256, 16))
    args.paths = args.paths or (["eager"] if args.quick else ["eager", "compiled"])
    return args


def make_prompt(config, batch_size, args, device):
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, config["vocab_size"], (batch_size, args.prompt_tokens), generator=generator).to(device)


def generator_of(side, model, dtype_name="float32", compiled=True):
    """A function (prompt, new tokens) -> ids doing greedy decoding with a KV cache on `model`; ours is
    prepared as the generating scripts prepare it for --dtype `dtype_name`."""
    model.eval()
    if side == "ours":
        decoder = decoder_for(prepare_for_generation(model, dtype_name), compiled)
        return lambda prompt, new_tokens: generate(model, prompt, new_tokens, decoder=decoder)
    # Random weights may produce <|endoftext|>; like ours, the reference must not stop there.
    model.generation_config.eos_token_id = None
    return lambda prompt, new_tokens: model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False, use_cache=True,
        pad_token_id=0)


def generation_speeds(args, config, device, batch_size, sides):
    """({side: [new tokens/s per run]}, {side: the last run's new tokens}), the sides alternating."""
    prompt = make_prompt(config, batch_size, args, device)
    # Warm-up: the first call allocates; compiled, it compiles for this cache length.
    warm_up_tokens = args.new_tokens if "compiled" in args.paths else 4
    for run in sides.values():
        run(prompt, warm_up_tokens)
    speeds, outputs = {side: [] for side in sides}, {}
    for _ in range(args.repeats):
        for side, run in sides.items():
            seconds, output = timed(lambda: run(prompt, args.new_tokens), device)
            speeds[side].append(batch_size * args.new_tokens / seconds)
            outputs[side] = output[:, args.prompt_tokens:]
    return speeds, outputs


def weight_bytes(model):
    """The bytes of weights a generated token reads: all (int8 ones are buffers), the tied head once; of
    the tables it only looks up (the positions; the token embedding when the head has a copy of its own,
    as int8's), one row."""
    tensors = {tensor.data_ptr(): tensor for tensor in [*model.parameters(), *model.buffers()]}
    lookups = [model.position_embedding.weight]
    if model.out_head.weight is not model.token_embedding.weight:
        lookups.append(model.token_embedding.weight)
    return sum(tensor.nbytes for tensor in tensors.values()) - sum(table.nbytes for table in lookups)


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
    generator_of(args.worker, model, args.worker_dtype, args.paths == ["compiled"])(
        make_prompt(config, 1, args, device), args.new_tokens)
    report_from_worker({"peak_memory": peak_memory_bytes(device)})


def side_label(dtype, path):
    return f"{dtype} compiled" if path == "compiled" else dtype


def native_dtype(device):
    """What --dtype auto stands for here, as a name."""
    return str(auto_dtype(device)).removeprefix("torch.")


def our_sides(args, device):
    """(dtype, path) pairs: --dtypes (default float32, bfloat16 where the machine computes it natively,
    what --dtype auto picks, and int8) by --paths (int8 compiled only)."""
    native = native_dtype(device)
    dtypes = args.dtypes or ["float32", *([native] if native != "float32" else []), "int8"]
    return [(dtype, path) for dtype in dtypes for path in args.paths if dtype != "int8" or path == "compiled"]


def run(args):
    """The result rows of W1: each of our (dtype, path) sides against transformers in float32 (float32's
    tokens must be identical to transformers'; the others' share of greedy tokens equal to transformers')."""
    import transformers

    transformers.logging.set_verbosity_error()
    device = setup(args)
    config = benchmark_config(args)
    ours, reference = model_pair(config, args.seed, device)
    sides = {"reference": generator_of("reference", reference)}
    models = {}
    for dtype, path in our_sides(args, device):
        models[dtype, path] = copy.deepcopy(ours)
        sides[dtype, path] = generator_of("ours", models[dtype, path], dtype, path == "compiled")
    bandwidth = memory_read_bandwidth(device, megabytes=64 if args.quick else 1024)
    shape = f"{args.prompt_tokens}+{args.new_tokens} tokens"
    rows = []
    for batch_size in args.batch_sizes:
        speeds, outputs = generation_speeds(args, config, device, batch_size, sides)
        for (dtype, path), model in models.items():
            label = side_label(dtype, path)
            if dtype == "float32":
                identical = torch.equal(outputs[dtype, path], outputs["reference"])
                tokens = f"greedy tokens {'identical' if identical else 'DIFFER'}"
            else:
                same = (outputs[dtype, path] == outputs["reference"]).float().mean().item()
                tokens = f"{same:.0%} of the greedy tokens as transformers'"
            auto = " (--dtype auto)" if dtype == native_dtype(device) else ""
            row = Row(f"W1 generation, {dtype}{auto}{label.removeprefix(dtype)}, batch {batch_size}, {shape}, "
                      f"against transformers' float32, {tokens}", "new tokens/s", speeds[dtype, path], speeds["reference"])
            rows.append(row)
            if batch_size != 1:
                continue
            target = {"float32": TARGET_SPEEDUP, "bfloat16": TARGET_BF16_SPEEDUP}.get(dtype)
            if target:
                row.target, row.met = f">= {target}x", row.ratio >= target and (dtype != "float32" or identical)
            rows.append(bound_row(label, model, {"ours": speeds[dtype, path], **(
                {"reference": speeds["reference"]} if dtype == "float32" else {})}, bandwidth,
                TARGET_SHARE_OF_BOUND if dtype == "float32" else None))
    workers = [("reference", "float32", "eager")] + [("ours", dtype, path) for dtype, path in models]
    memory = run_workers("benchmarks.bench_generation",
                         [["--worker", side, "--worker-dtype", dtype, "--paths", path, *worker_flags(args)]
                          for side, dtype, path in workers], parallel=args.quick)
    peaks = {side: result["peak_memory"] / 2**20 for side, result in zip(workers, memory)}
    for dtype, path in models:
        rows.append(Row(f"W1 peak memory, {side_label(dtype, path)}, batch 1, {shape} (fresh process), against "
                        "transformers' float32", "MiB", [peaks["ours", dtype, path]], [peaks["reference", "float32", "eager"]],
                        digits=0))
    return rows


def worker_flags(args):
    return [*common_flags(args), "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]


def main():
    benchmark_main(parse_args, worker, run, "Generation")


if __name__ == "__main__":
    run_main(main)

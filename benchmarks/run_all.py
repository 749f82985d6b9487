"""Run every benchmark (generation, also against the other engines, training, loading) against its reference
and print one Markdown table.

    python -m benchmarks.run_all                   # GPT-2 124M on this machine's CPU (minutes)
    python -m benchmarks.run_all --size 355M --device cuda
    python -m benchmarks.run_all --quick           # a tiny model, a few steps: checks that everything runs

Each row gives the median of ours and of the reference, their ratio (ours / reference), the range of the
runs and the target. The workloads, the FLOP formula and the results are described in
benchmarks/README.md; each benchmarks/bench_*.py also runs alone (python -m benchmarks.bench_...) and has
more flags.
"""
import sys
import time

from benchmarks import bench_engines, bench_generation, bench_loading, bench_training
from benchmarks.measure import BackgroundLoad
from benchmarks.script import common_flags, common_parser, setup
from benchmarks.tables import machine_description, markdown_table
from modules.errors import run_main

WORKLOADS = {"generation": bench_generation, "engines": bench_engines, "training": bench_training, "loading": bench_loading}


def main():
    parser = common_parser(__doc__)
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS),
                        help="which to run (default: all)")
    args = parser.parse_args()
    device = setup(args)
    rows, start = [], time.perf_counter()
    with BackgroundLoad() as load:
        for name in args.workloads:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            script = WORKLOADS[name]
            rows += script.run(script.parse_args(common_flags(args)))
    size = "quick (tiny model)" if args.quick else f"GPT-2 {args.size}"
    print(f"\n{size}, {machine_description(device, args.threads)}; {time.perf_counter() - start:.0f} s. "
          f"{load.describe()} Reference: transformers' GPT2LMHeadModel (W1, W2), the other engines (W1 engines), the original project's loader (W3).\n")
    print(markdown_table(rows), flush=True)


if __name__ == "__main__":
    run_main(main)

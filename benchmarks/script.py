"""What every benchmark script shares: its flags, its set-up, and its main.

Every workload runs ours and a reference side by side on the same machine in the same run and reports
ratios, so a busy machine slows both sides alike. A script runs as `python -m benchmarks.NAME` from the
repository's root; with --worker it is one side alone in a fresh process (benchmarks.measure.run_worker).
"""
import argparse
import os

import torch

from .measure import BackgroundLoad
from .tables import machine_description, markdown_table

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


def common_parser(doc):
    """A parser described by the first paragraph of the script's docstring `doc`, with the flags every
    benchmark takes."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    return parser


def benchmark_parser(doc):
    """The parser of one benchmark script: common_parser's, and the hidden flags of its workers."""
    parser = common_parser(doc)
    parser.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-dtype", default="float32", help=argparse.SUPPRESS)
    return parser


def parse_with_quick_defaults(parser, argv, **defaults):
    """The parsed flags, where each flag named in `defaults` (name=(default, default with --quick)) that
    was not given takes the default of the run's size."""
    args = parser.parse_args(argv)
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


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

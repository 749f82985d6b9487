"""The app's start: how long a user waits for the first token, and whether a second start compiles anything.

The app (app.py) serves its first answers with the eager decoding step while the compiled one is built in
the background, from inductor's on-disk cache where an earlier start left it. Two fresh processes start
one after the other over one new, empty cache folder and run what the app runs for a text-completion
page (app.load_model, then app.stream_answer with the page's default settings, twice): the first start
compiles, the second should find everything on disk. Reported side by side, the second start (ours)
against the first (reference); times count from the process's launch, so Python's and torch's imports
are in them.

    python -m benchmarks.bench_app_start                   # a random GPT-2 124M checkpoint, --dtype auto
    python -m benchmarks.bench_app_start --dtype float32
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.measure import report_from_worker, run_worker
from benchmarks.script import benchmark_config, benchmark_main, benchmark_parser, common_flags, setup
from benchmarks.tables import Row
from modules.errors import run_main
from modules.speed import GENERATION_DTYPES

PROMPT = "Every effort moves you"


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--dtype", default="auto", choices=GENERATION_DTYPES,
                        help="the app's --dtype (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--launched-at", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def timed_answer(answer, launched_at, new_tokens):
    """(seconds from launch to the first piece of text, new tokens per second from the request to the last
    piece) of one answer of `new_tokens` tokens."""
    asked, first = time.time(), None
    for _ in answer:
        first = first or time.time()
    return first - launched_at, new_tokens / (time.time() - asked)


def worker(args):
    """One start of the app in this fresh process: load the checkpoint as the app does, answer twice (the
    second time once the compiled step is ready) and report the times and what the build printed."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(args.cache_dir)  # before anything compiles
    import app
    from modules.speed import compiled_generation

    printed = []
    compiled_generation.report = printed.append  # what the build prints, kept for the table
    cached_files = compiled_generation.cached_files
    device = setup(args)
    files_before = len(cached_files())
    loaded = app.load_model(args.checkpoint, device, args.dtype, compiled=True)
    loaded_at = time.time()
    # Greedy, and past <|endoftext|> (random weights may produce it): every answer as long.
    settings = {**app.GENERATION_DEFAULTS["lm"], "temperature": 0.0, "stop_at_end_of_text": False}
    new_tokens = settings["max_new_tokens"]
    first_token, eager_speed = timed_answer(app.stream_answer(loaded.model, PROMPT, settings, loaded.decoder),
                                            args.launched_at, new_tokens)
    decoding = loaded.decoder
    tokens = len(app.prompt_ids(PROMPT, device)[0]) + new_tokens
    while not decoding.ready_or_build_in_background(1, tokens) and not decoding.failed:  # as later requests ask
        time.sleep(0.05)
    ready_at = time.time()
    compiled_answer = app.stream_answer(loaded.model, PROMPT, settings, loaded.decoder)
    compiled_first_token, compiled_speed = timed_answer(compiled_answer, ready_at, new_tokens)
    report_from_worker({
        "loaded": loaded_at - args.launched_at, "first_token": first_token, "eager_speed": eager_speed,
        "compiled_ready": ready_at - args.launched_at, "compiled_first_token": compiled_first_token,
        "compiled_speed": compiled_speed, "files_written": len(cached_files()) - files_before,
        "failed": decoding.failed, "printed": printed})


def run(args):
    """Two starts over one empty cache folder: the rows compare the second with the first."""
    import torch

    from modules import GPTModel
    from modules.checkpoint import save_checkpoint

    config = {**benchmark_config(args), "vocab_size": 50257}  # the app's prompts are GPT-2 tokens
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "model.pt"
        torch.manual_seed(args.seed)
        save_checkpoint(checkpoint, GPTModel(config), "lm")
        flags = [*common_flags(args), "--worker", "ours", "--dtype", args.dtype, "--checkpoint", checkpoint,
                 "--cache-dir", Path(folder) / "torch-compile"]
        first, second = (run_worker("benchmarks.bench_app_start", [*flags, "--launched-at", time.time()])
                         for _ in range(2))
    for start, result in (("first", first), ("second", second)):
        print(f"{start} start: " + " ".join(result["printed"]), file=sys.stderr)
    label = f"W4 app start, {args.dtype}, second against first"
    rows = [Row(f"{label}: seconds from launch to the model loaded", "s", [second["loaded"]], [first["loaded"]]),
            Row(f"{label}: to the first token (eager step, compiled one building)", "s",
                [second["first_token"]], [first["first_token"]]),
            Row(f"{label}: to the compiled step ready", "s", [second["compiled_ready"]], [first["compiled_ready"]]),
            Row(f"{label}: the compiled step's answer, first token after it is ready", "s",
                [second["compiled_first_token"]], [first["compiled_first_token"]], digits=2),
            Row(f"{label}: the first answer, eager step (while the compiled one is built)", "new tokens/s",
                [second["eager_speed"]], [first["eager_speed"]]),
            Row(f"{label}: an answer with the compiled step", "new tokens/s", [second["compiled_speed"]],
                [first["compiled_speed"]]),
            Row(f"{label}: files written to inductor's cache", "files", [second["files_written"]],
                [first["files_written"]], digits=0)]
    rows[-1].target, rows[-1].met = "0 (second start)", second["files_written"] == 0 and not second["failed"]
    return rows


def main():
    benchmark_main(parse_args, worker, run, "App start")


if __name__ == "__main__":
    run_main(main)

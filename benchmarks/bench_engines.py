"""W1 across engines: our greedy generation against the inference engines a user could run instead
(transformers, CTranslate2, ONNX Runtime, llama.cpp), on the same random GPT-2 weights, batch 1.

    python -m benchmarks.bench_engines                  # 124M, 64-token prompt + 256 new tokens, every thread
    python -m benchmarks.bench_engines --paths eager --peers ctranslate2:int8 onnxruntime:int8
    pip install -r requirements-bench.txt               # the engines; one that is missing is skipped, saying why

Every engine and dtype runs in a worker process of its own (benchmarks/engines.py: no two OpenMP runtimes
in one process), our sides as bench_generation.py runs them. The workers start one after the other, each
loading, converting and warming up (compiling, for ours compiled) while the others wait; then the timed
runs take turns round-robin, the order rotating each repetition, so that a machine growing busier slows
every engine alike. Each engine's row has its speed against ours in the same dtype (ours / theirs, as
every table here; q8_0 counts as int8; our fastest where we have no such dtype), and the share of its
memory bound each side reaches (engines.bytes_read_per_token). The greedy tokens are compared with our
float32's: on random weights the most likely tokens are nearly tied, so another dtype changes them.
"""
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from benchmarks.bench_generation import make_prompt, our_sides
from benchmarks.engines import CONVERTERS, ENGINES, bytes_read_per_token, missing_package, save_shared_weights
from benchmarks.measure import REPO, ResidentWorker, last_line, memory_read_bandwidth, run_worker
from benchmarks.script import benchmark_config, benchmark_main, common_parser, parse_with_quick_defaults, setup
from benchmarks.tables import Row
from modules.errors import UserError, run_main

PEERS = ["transformers:float32", "ctranslate2:int8", "ctranslate2:float32", "onnxruntime:int8",
         "llama.cpp:bfloat16", "llama.cpp:q8_0"]
NAMES = {"ours": "ours", "transformers": "transformers", "ctranslate2": "CTranslate2", "onnxruntime": "ONNX Runtime",
         "llama.cpp": "llama.cpp"}
SETTLE_SECONDS = 0.5  # after its run an engine's OpenMP threads spin a while: the next run starts after them


def parse_args(argv=None):
    parser = common_parser(__doc__)
    parser.add_argument("--prompt-tokens", type=int, help="prompt length (default: 64; 8 with --quick)")
    parser.add_argument("--new-tokens", type=int, help="tokens to generate (default: 256; 16 with --quick)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine; the median counts (default: %(default)s)")
    parser.add_argument("--paths", nargs="+", choices=("eager", "compiled"),
                        help="our decoding step eager, compiled or both (default: both; eager with --quick)")
    parser.add_argument("--dtypes", nargs="+", choices=ENGINES["ours"][0],
                        help="our dtypes (default: float32, bfloat16 where native, int8)")
    parser.add_argument("--peers", nargs="+", default=PEERS, metavar="ENGINE:DTYPE",
                        help=f"the other engines (default: %(default)s; engines: {', '.join(list(ENGINES)[1:])})")
    parser.add_argument("--folder", type=Path, default=REPO / ".cache" / "bench-engines",
                        help="where the shared weights and each engine's conversion of them are kept (default: %(default)s)")
    parser.set_defaults(worker=None)
    args = parse_with_quick_defaults(parser, argv, prompt_tokens=(64, 8), new_tokens=(256, 16))
    args.paths = args.paths or (["eager"] if args.quick else ["eager", "compiled"])
    args.peers = [parse_peer(peer) for peer in args.peers]
    return args


def parse_peer(text):
    engine, _, dtype = text.partition(":")
    if engine not in ENGINES or engine == "ours" or dtype not in ENGINES[engine][0]:
        choices = ", ".join(f"{name}:{d}" for name, (dtypes, _) in ENGINES.items() if name != "ours" for d in dtypes)
        raise UserError(f"--peers takes ENGINE:DTYPE, one of {choices}; not {text!r}")
    return engine, dtype


@dataclass
class Side:
    """One engine in one dtype: its worker, its speeds, and its first run's tokens, or why it is skipped."""

    engine: str
    dtype: str
    compiled: bool = False
    speeds: list = field(default_factory=list)
    tokens: list = None
    skipped: str = None
    worker: ResidentWorker = None

    @property
    def label(self):
        """"ours float32 compiled", "CTranslate2 4.8.5 int8": the other engines with their version."""
        package = next((package for _, package in ENGINES[self.engine][1]), None)
        version = f" {metadata.version(package)}" if package and not missing_package(self.engine) else ""
        return f"{NAMES[self.engine]}{version} {self.dtype}" + (" compiled" if self.compiled else "")

    def start(self, args, folder, prompt):
        """Convert, load and warm up (the warm-up's tokens are the ones compared); `skipped` says what failed."""
        self.skipped = missing_package(self.engine)
        flags = [self.engine, self.dtype, "--folder", folder, "--threads", args.threads]
        if not self.skipped and self.engine in CONVERTERS:
            try:
                run_worker("benchmarks.engines", [*flags, "--convert"])
            except RuntimeError as error:
                self.skipped = f"its conversion failed: {last_line(str(error))}"
        if not self.skipped:
            self.worker = ResidentWorker("benchmarks.engines", [*flags, *(["--compiled"] if self.compiled else [])],
                                         env={"OMP_NUM_THREADS": str(args.threads)})
            reply = self.worker.ready and self.worker.ask({"prompt": prompt, "new_tokens": args.new_tokens})
            self.tokens, self.skipped = reply and reply["tokens"], self.worker.error
        print(f"{self.label}: {'skipped, ' + self.skipped if self.skipped else 'ready'}", file=sys.stderr, flush=True)

    def timed_run(self, prompt, new_tokens):
        reply = self.worker.ask({"prompt": prompt, "new_tokens": new_tokens})
        if reply is None:
            self.skipped = f"it failed while generating: {self.worker.error}"
        else:
            self.speeds.append(new_tokens / reply["seconds"])

    @property
    def speed(self):
        """The median of its timed runs."""
        return statistics.median(self.speeds)


def take_turns(sides, args, prompt):
    """args.repeats timed runs of each live side, round-robin, the first side rotating each repetition."""
    for repeat in range(args.repeats):
        live = [side for side in sides if side.worker and not side.skipped]
        if not live:
            return
        for side in live[repeat % len(live):] + live[:repeat % len(live)]:
            time.sleep(SETTLE_SECONDS)
            side.timed_run(prompt, args.new_tokens)
        print(f"timed run {repeat + 1} of {args.repeats} done for {len(live)} engines", file=sys.stderr, flush=True)


def run(args):
    """The rows: ours in each dtype and path with its share of the memory bound, then every other engine
    against ours, then our fastest against the fastest of them."""
    device = setup(args)
    if device.type != "cpu":
        return [Row("W1 engines: skipped, the engines are measured on the CPU (--device cpu)", "new tokens/s", [])]
    config = benchmark_config(args)
    folder = args.folder / f"{'quick' if args.quick else args.size}-seed{args.seed}"
    save_shared_weights(config, args.seed, folder)
    prompt = make_prompt(config, 1, args, device)[0].tolist()
    ours = [Side("ours", dtype, path == "compiled") for dtype, path in our_sides(args, device)]
    peers = [Side(engine, dtype) for engine, dtype in args.peers]
    try:
        for side in ours + peers:
            side.start(args, folder, prompt)
        bandwidth = memory_read_bandwidth(device, megabytes=64 if args.quick else 1024)
        take_turns(ours + peers, args, prompt)
    finally:
        for side in ours + peers:
            if side.worker:
                side.worker.close()
    return engine_rows(ours, peers, config, bandwidth, args)


def engine_rows(ours, peers, config, bandwidth, args):
    shape = f"batch 1, {args.prompt_tokens}+{args.new_tokens} tokens"
    float32 = next((side for side in ours if side.dtype == "float32" and side.tokens), None)

    def share_of_bound(side):
        return side.speed * bytes_read_per_token(config, side.dtype) / bandwidth

    def tokens(side):
        """How far its greedy tokens are our float32's."""
        if float32 is None or side is float32:
            return ""
        same = next((i for i, (a, b) in enumerate(zip(side.tokens, float32.tokens)) if a != b), len(side.tokens))
        return f"; greedy tokens {'all' if same == len(side.tokens) else f'the first {same} of {len(side.tokens)}'} as ours float32's"

    rows, measured = [], [side for side in ours if not side.skipped]
    for side in ours + peers:
        if side.skipped:
            rows.append(Row(f"W1 engines, {side.label}: skipped, {side.skipped}", "new tokens/s", []))
        elif side.engine == "ours":
            rows.append(Row(f"W1 engines, {side.label}, {shape}: {share_of_bound(side):.0%} of its memory bound"
                            f"{tokens(side)}", "new tokens/s", side.speeds))
        elif measured:
            family = "int8" if side.dtype == "q8_0" else side.dtype
            mine = fastest([mine for mine in measured if mine.dtype == family] or measured)
            rows.append(Row(f"W1 engines, {side.label} against {mine.label}, {shape}; share of the memory bound: ours "
                            f"{share_of_bound(mine):.0%}, {NAMES[side.engine]} {share_of_bound(side):.0%}{tokens(side)}",
                            "new tokens/s", mine.speeds, side.speeds))
    others = [side for side in peers if not side.skipped]
    if measured and others:
        mine, theirs = fastest(measured), fastest(others)
        row = Row(f"W1 engines, our fastest ({mine.label}) against the fastest engine ({theirs.label}), {shape}",
                  "new tokens/s", mine.speeds, theirs.speeds, target=">= 1.0x")
        row.met = row.ratio >= 1.0
        rows.append(row)
    return rows


def fastest(sides):
    return max(sides, key=lambda side: side.speed)


def main():
    benchmark_main(parse_args, None, run, "Generation against the engines")


if __name__ == "__main__":
    run_main(main)

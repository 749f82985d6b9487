"""The benchmarks run end to end on a tiny model, so they cannot rot. Nothing here asserts a timing."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.bench_training import flops_per_token
from modules import GPT_CONFIGS
from modules.speed import auto_dtype
import pytest

pytestmark = pytest.mark.slow  # not in the quick tier (python -m pytest -m "not slow")

REPO = Path(__file__).resolve().parents[1]


def test_run_all_quick_prints_every_workload_with_ratios():
    result = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--quick"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| W")]
    # The rows of the dtype --dtype auto picks say so ("float32 (--dtype auto)" where bfloat16 is not native).
    workloads = [row.split(" | ")[0].replace("float32 (--dtype auto)", "float32") for row in rows]
    expected = ["W1 generation, float32, batch 1", "W1 batch 1, float32: share of the memory bound",
                "W1 generation, float32, batch 8", "W1 peak memory, float32", "W2 training step, float32",
                "W2 model FLOPs utilisation, float32", "W2 peak memory, float32", "W3 loading an OpenAI checkpoint",
                "W3 loading, RSS growth", "W1 engines, ours float32, batch 1", "W1 engines, transformers float32"]
    if auto_dtype("cpu") == torch.bfloat16:  # where the CPU computes bfloat16 natively, its rows too
        expected += ["W1 generation, bfloat16 (--dtype auto)", "W1 batch 1, bfloat16: share of the memory bound",
                     "W2 training step, bfloat16 autocast", "W2 model FLOPs utilisation, bfloat16"]
    for name in expected:
        assert any(workload.startswith("| " + name) for workload in workloads), (name, result.stdout)
    assert re.search(r"\d+ cores \(.*\), \d+ threads, torch ", result.stdout), result.stdout  # where it ran
    # Our greedy decoding must give transformers' tokens, for one prompt and for a batch.
    assert sum("greedy tokens identical" in row for row in rows) == 2, result.stdout
    for row in rows:
        reference, ratio = row.split(" | ")[2:4]
        assert reference == "–" or re.fullmatch(r"\d+\.\d\dx", ratio), row  # a side by side row has its ratio


def test_a_second_start_of_the_app_compiles_nothing():
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_app_start", "--quick", "--dtype", "float32"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    files = next(line for line in result.stdout.splitlines() if "files written to inductor's cache" in line)
    second, first = (int(cell.split()[0]) for cell in files.split(" | ")[1:3])
    assert second == 0 < first and "(met)" in files, result.stdout


def test_engines_benchmark_runs_the_installed_engines_and_names_why_the_others_are_skipped(tmp_path):
    # Where an engine is installed (CTranslate2 on the developers' machine), it runs on the tiny model's
    # weights; where it is not (both in CI), its row says so and the others still run.
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_engines", "--quick", "--dtypes", "float32",
                             "--repeats", "1", "--folder", str(tmp_path),
                             "--peers", "transformers:float32", "ctranslate2:int8", "llama.cpp:q8_0"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| W1 engines")]
    assert re.search(r"\d+ cores \(.*\), \d+ threads, torch ", result.stdout), result.stdout
    assert any(row.startswith("| W1 engines, ours float32, batch 1, 8+16 tokens: ") and "% of its memory bound" in row
               for row in rows), result.stdout
    # The same weights and prompt reach every engine: transformers' greedy tokens are our float32's.
    assert any(row.startswith("| W1 engines, transformers float32 against ours float32")
               and "greedy tokens all as ours float32's" in row and re.search(r" \| \d+\.\d\dx \| ", row)
               for row in rows), result.stdout
    for name, module, package, dtype in [("CTranslate2", "ctranslate2", "ctranslate2", "int8"),
                                         ("llama.cpp", "llama_cpp", "llama-cpp-python", "q8_0")]:
        if importlib.util.find_spec(module) is None:
            expected = f"| W1 engines, {name} {dtype}: skipped, {package} is not installed (pip install -r requirements-bench.txt)"
            assert any(row.startswith(expected) for row in rows), (expected, result.stdout)
        else:  # it runs, or says why not: llama.cpp takes only GPT-2's 50,257-token vocabulary, not --quick's
            assert any(re.match(rf"\| W1 engines, {re.escape(name)} [\d.]+ {dtype}( against ours float32, .*"
                                r" \| \d+\.\d\dx \| |: skipped, \w)", row) for row in rows), (name, result.stdout)
    assert any(row.startswith("| W1 engines, our fastest (ours float32) against the fastest engine (") for row in rows)


def test_flop_formula_is_nanogpts():
    # nanoGPT's estimate_mfu for GPT-2 124M at 1024 tokens: 6 N + 12 L H Q T, N without the position embedding.
    assert flops_per_token(GPT_CONFIGS["124M"], 1024) == 6 * 123_653_376 + 12 * 12 * 768 * 1024


def test_a_worker_measures_its_own_peak_memory_not_its_parents():
    ballast = torch.ones(600 * 2**20 // 4)  # 600 MiB held by this process while the worker runs
    code = "from benchmarks.measure import peak_rss_bytes; print(peak_rss_bytes())"
    child_peak = int(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                    check=True).stdout)
    assert child_peak < ballast.numel() * 4

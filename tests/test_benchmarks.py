"""The benchmarks run end to end on a tiny model, so they cannot rot. Nothing here asserts a timing."""
import re
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.bench_training import flops_per_token
from modules import GPT_CONFIGS

REPO = Path(__file__).resolve().parents[1]


def test_run_all_quick_prints_every_workload_with_ratios():
    result = subprocess.run([sys.executable, "benchmarks/run_all.py", "--quick"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| W")]
    workloads = [row.split(" | ")[0] for row in rows]
    for expected in ["W1 generation, batch 1", "W1 generation, batch 8", "W1 peak memory", "W2 training step",
                     "W2 model FLOPs utilisation", "W2 peak memory", "W3 loading an OpenAI checkpoint",
                     "W3 loading, RSS growth"]:
        assert any(workload.startswith("| " + expected) for workload in workloads), (expected, result.stdout)
    # Our greedy decoding must give transformers' tokens, for one prompt and for a batch.
    assert sum("greedy tokens identical" in row for row in rows) == 2, result.stdout
    for row in rows:
        ratio = row.split(" | ")[3]
        assert re.fullmatch(r"\d+\.\d\dx", ratio), row


def test_flop_formula_is_nanogpts():
    # nanoGPT's estimate_mfu for GPT-2 124M at 1024 tokens: 6 N + 12 L H Q T, N without the position embedding.
    assert flops_per_token(GPT_CONFIGS["124M"], 1024) == 6 * 123_653_376 + 12 * 12 * 768 * 1024


def test_a_worker_measures_its_own_peak_memory_not_its_parents():
    ballast = torch.ones(600 * 2**20 // 4)  # 600 MiB held by this process while the worker runs
    code = "from benchmarks.common import peak_rss_bytes; print(peak_rss_bytes())"
    child_peak = int(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                    check=True).stdout)
    assert child_peak < ballast.numel() * 4

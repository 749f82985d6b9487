import json
import sys

import pytest
import torch

from modules.config import ConfigError, resolve_config
from modules.device import get_device
from modules.errors import UserError

from tests.conftest import run_script


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="124M, 355M, 774M, 1558M, tiny"):
        resolve_config("huge")


def test_json_config_checks_divisibility(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"embedding_dim": 100, "num_heads": 3}))
    with pytest.raises(ConfigError, match="divisible by num_heads"):
        resolve_config(str(path))
    path.write_text(json.dumps({"embedding_dim": 96, "num_heads": 3, "num_layers": 2}))
    assert resolve_config(str(path))["embedding_dim"] == 96


@pytest.mark.parametrize("cuda, mps, best", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_the_default_device_is_the_best_available(monkeypatch, cuda, mps, best):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert get_device(None) == get_device("auto") == torch.device(best)


def test_a_named_device_and_an_unavailable_one(monkeypatch):
    assert get_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available on this machine; use one of: cpu$"):
        get_device("cuda")


PAGE_FAULTS_OF_A_REALLOCATION = """
import resource, sys
import torch
from modules.speed import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.ones(256 * 2**20 // 4)  # 256 MB, like the logits of a training step, freed at once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = torch.ones(64 * 2**20 // 4)  # 64 MB, more than glibc's largest mmap threshold (32 MB)
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_keep_freed_memory_reuses_pages_of_large_blocks():
    """Without it, a 64 MB tensor gets fresh pages from the kernel (16k faults of 4 KiB pages) although
    a larger block was just freed; with it, that block's pages."""
    results = {}
    for mode in ("default", "keep"):
        took, faults = run_script("-c", PAGE_FAULTS_OF_A_REALLOCATION, mode).stdout.split()
        results[mode] = (took, int(faults))
    if results["keep"][0] != "True":
        pytest.skip("this C library is not glibc: keep_freed_memory does nothing here")
    assert results["default"][1] > 0
    assert results["keep"][1] * 10 < results["default"][1], results

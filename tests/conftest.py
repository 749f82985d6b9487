import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A model small enough that a training step takes milliseconds.
MICRO_CONFIG = {"vocab_size": 50257, "context_size": 32, "embedding_dim": 32, "num_heads": 2,
                "num_layers": 1, "drop_rate": 0.0, "qkv_bias": True}


def run_script(*args, cwd=REPO, timeout=600, env=None, check=True):
    """Run `python <args>` as a user would; returns the CompletedProcess (stdout and stderr as text)."""
    result = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(autouse=True)
def user_cache_folder(tmp_path_factory, monkeypatch):
    """Each test's own user cache folder (modules/caches.py), also for the scripts it runs: no test reads
    what another left in ~/.cache, nor leaves anything there."""
    folder = tmp_path_factory.mktemp("user-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return folder / "gpt2-from-scratch"


@pytest.fixture
def micro_config(tmp_path):
    path = tmp_path / "micro.json"
    path.write_text(json.dumps(MICRO_CONFIG))
    return path


@pytest.fixture
def small_corpus(tmp_path):
    """About 60k characters of pseudo-English, the same for every test."""
    words = "the king queen love death night day sword crown ghost sea wind speak tell know heart".split()
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(800))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path

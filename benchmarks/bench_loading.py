"""W3, loading: wall time and memory of turning an OpenAI GPT-2 checkpoint (TensorFlow, written here in
OpenAI's exact layout with random weights) into a GPTModel, each load in a fresh process after its imports:
modules.pretrained.load_gpt2 against the original project's loader, step by step (its get_gpt_weights.py):
every TensorFlow variable read into a dict first, a randomly initialised model with an untied head, then
each weight replaced by a new Parameter made from a copy of its array.

    python -m benchmarks.bench_loading                     # 124M
    python -m benchmarks.bench_loading --size 355M
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.measure import current_rss_bytes, peak_rss_bytes, report_from_worker, run_workers
from benchmarks.reference import reference_model
from benchmarks.script import (
    benchmark_config, benchmark_main, benchmark_parser, common_flags, parse_with_quick_defaults, setup,
)
from benchmarks.tables import Row
from modules import GPTModel
from modules.errors import run_main

TARGET_TIME_RATIO = 0.5  # of the original loader's time
TARGET_MEMORY_FACTOR = 1.3  # RSS growth while loading, in fp32 weight bytes


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--repeats", type=int, help="fresh-process loads per side, alternating (default: 3; 1 with --quick)")
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    return parse_with_quick_defaults(parser, argv, repeats=(3, 1))


def write_checkpoint(config, seed, model_dir):
    """An OpenAI-layout checkpoint of the config's shape with random weights."""
    from tests.openai_layout import gpt2_tensors_from_transformers, hparams_from_transformers, write_openai_checkpoint

    reference = reference_model(config, seed, "cpu")
    write_openai_checkpoint(gpt2_tensors_from_transformers(reference), hparams_from_transformers(reference.config),
                            model_dir)


class UntiedGPTModel(GPTModel):
    """The original's model: randomly initialised, its output head a Linear of its own, not tied to the
    token embedding."""

    def __init__(self, config):
        super().__init__(config)
        self.out_head = torch.nn.Linear(config["embedding_dim"], config["vocab_size"], bias=False)


def load_like_the_original(model_dir):
    """The original project's loader, step by step (its get_gpt_weights.py; our model's layout):

    1. every variable of the checkpoint read with tf.train.load_variable and squeezed, all kept in a dict
       before the model exists (load_params_from_tf_ckpt);
    2. a model with random weights whose output head is a Linear of its own, not tied to the token
       embedding (its model.py);
    3. each weight replaced by torch.nn.Parameter(torch.tensor(array)), a new Parameter holding a copy
       (load_weights_to_model). Its per-layer loop also assigns the final norm and the head, so the
       token embedding is copied into a new head once per layer.
    """
    import json

    import numpy as np
    import tensorflow as tf

    from modules.pretrained import gpt2_name_to_ours

    hparams = json.loads((model_dir / "hparams.json").read_text())
    checkpoint = tf.train.latest_checkpoint(str(model_dir))
    arrays = {name.removeprefix("model/"): np.squeeze(tf.train.load_variable(checkpoint, name))
              for name, _ in tf.train.list_variables(checkpoint)}

    config = {"vocab_size": hparams["n_vocab"], "context_size": hparams["n_ctx"], "embedding_dim": hparams["n_embd"],
              "num_heads": hparams["n_head"], "num_layers": hparams["n_layer"], "drop_rate": 0.0, "qkv_bias": True}
    model = UntiedGPTModel(config)

    def replace(parameter_name, array):
        module_name, _, attribute = parameter_name.rpartition(".")
        setattr(model.get_submodule(module_name), attribute, torch.nn.Parameter(torch.tensor(array)))

    for name in ("wte", "wpe"):
        replace(gpt2_name_to_ours(name), arrays[name])
    # The original splits c_attn into query, key and value and copies each third; our fused projection
    # takes the three copies as one, the same bytes.
    for layer in range(config["num_layers"]):
        for name, array in arrays.items():
            if name.startswith(f"h{layer}/"):
                replace(gpt2_name_to_ours(name), array.T if name.endswith("/w") else array)
        for name in ("ln_f/g", "ln_f/b"):
            replace(gpt2_name_to_ours(name), arrays[name])
        replace("out_head.weight", arrays["wte"])
    return model


def worker(args):
    """One load in this fresh process; memory counts from after the imports (TensorFlow included)."""
    import tensorflow  # noqa: F401  imported here so that neither side's load pays for it

    from modules.pretrained import load_gpt2

    setup(args)
    load = load_gpt2 if args.worker == "ours" else load_like_the_original
    rss_after_imports = current_rss_bytes()
    start = time.perf_counter()
    model = load(args.model_dir)
    seconds = time.perf_counter() - start
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # the tied head counted once
    report_from_worker({"seconds": seconds, "memory_growth": peak_rss_bytes() - rss_after_imports,
                        "weight_bytes": weight_bytes})


def run(args):
    """The result rows of W3."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    setup(args)
    config = benchmark_config(args)
    with tempfile.TemporaryDirectory(prefix="gpt2-checkpoint-") as model_dir:
        write_checkpoint(config, args.seed, model_dir)
        sides = ["reference", "ours"] * args.repeats  # alternating
        flag_lists = [["--worker", side, "--model-dir", model_dir, *common_flags(args)] for side in sides]
        results = {"ours": [], "reference": []}
        for side, result in zip(sides, run_workers("benchmarks.bench_loading", flag_lists, parallel=args.quick)):
            results[side].append(result)
    seconds = {side: [result["seconds"] for result in values] for side, values in results.items()}
    growth = {side: [result["memory_growth"] / 2**20 for result in values] for side, values in results.items()}
    weight_mib = results["ours"][0]["weight_bytes"] / 2**20
    time_row = Row("W3 loading an OpenAI checkpoint, wall time after imports (fresh process)", "s",
                   seconds["ours"], seconds["reference"], target=f"<= {TARGET_TIME_RATIO}x", digits=2)
    time_row.met = time_row.ratio <= TARGET_TIME_RATIO
    memory_row = Row(f"W3 loading, RSS growth (peak - after imports; fp32 weights {weight_mib:,.0f} MiB)", "MiB",
                     growth["ours"], growth["reference"], target=f"<= {TARGET_MEMORY_FACTOR}x weights (ours)", digits=0)
    memory_row.met = memory_row.median(growth["ours"]) <= TARGET_MEMORY_FACTOR * weight_mib
    return [time_row, memory_row]


def main():
    benchmark_main(parse_args, worker, run, "Loading")


if __name__ == "__main__":
    run_main(main)

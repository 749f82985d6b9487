"""--parallel fsdp and --activation-checkpointing through the three training scripts, as a user runs them
(torchrun, two processes on gloo)."""
import json
import subprocess
import sys

import pytest
import torch

from modules.checkpoint import load_checkpoint, open_checkpoint, read_checkpoint
from modules.errors import UserError
from modules.training import loop
from modules.training.memory_plan import GB
from modules.training.fsdp import read_train_state, sharded_state_path
from tests.conftest import REPO, run_script

pytestmark = pytest.mark.slow  # not in the quick tier (python -m pytest -m "not slow")


def torchrun(*args):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


def train_args(corpus, config, out, *extra):
    # float32, a constant learning rate: a run cut at step 2 and resumed takes the steps of a whole one.
    return ["train.py", "--data", corpus, "--init", "scratch", "--config", config, "--out", out, "--batch-size", "4",
            "--micro-batch-size", "1", "--eval-batches", "2", "--eval-interval", "2", "--sample-tokens", "4",
            "--lr", "1e-2", "--lr-schedule", "constant", "--warmup-steps", "0", "--dtype", "float32", "--no-compile-loss",
            *extra]


def sharded_progress(out):
    _, state = read_train_state(sharded_state_path(out), read_checkpoint(out)["config"])
    return state["progress"]


def test_two_fsdp_processes_stopped_and_resumed_in_one_train_as_one_plain_process(tmp_path, small_corpus, micro_config):
    run_script(*train_args(small_corpus, micro_config, tmp_path / "plain.pt", "--max-steps", "4"))
    output = torchrun(*train_args(small_corpus, micro_config, tmp_path / "sharded.pt", "--max-steps", "2",
                                  "--parallel", "fsdp", "--activation-checkpointing"))
    assert "memory per process (fsdp, 2 processes, activation checkpointing" in output
    assert sharded_progress(tmp_path / "sharded.pt")["step"] == 2
    run_script(*train_args(small_corpus, micro_config, tmp_path / "sharded.pt", "--max-steps", "4",
                           "--parallel", "fsdp", "--resume"))

    plain = read_checkpoint(tmp_path / "plain.last.pt")["train_state"]["progress"]
    sharded = sharded_progress(tmp_path / "sharded.pt")
    assert [loss for *_, loss in sharded["step_losses"]] == pytest.approx([loss for *_, loss in plain["step_losses"]], abs=1e-5)
    assert [e["val_loss"] for e in sharded["evaluations"]] == pytest.approx([e["val_loss"] for e in plain["evaluations"]], abs=1e-5)
    assert sharded["last_sample"] == plain["last_sample"]
    best, expected = load_checkpoint(tmp_path / "sharded.pt").state_dict(), load_checkpoint(tmp_path / "plain.pt").state_dict()
    for name, tensor in best.items():  # Adam's steps magnify the rounding of near-zero gradients: 1e-4
        torch.testing.assert_close(tensor, expected[name], atol=1e-4, rtol=1e-4)
    metrics = json.loads((tmp_path / "sharded.metrics.json").read_text())
    assert metrics["steps"] == 4 and (tmp_path / "sharded.loss.png").is_file()


def test_the_fine_tuning_scripts_train_under_fsdp_with_lora_and_activation_checkpointing(tmp_path, micro_config):
    instructions = tmp_path / "instructions.json"
    instructions.write_text(json.dumps([{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))}
                                        for i in range(1, 60)]))
    torchrun("fine_tune_instructional.py", "--data", instructions, "--init", "scratch", "--config", micro_config,
             "--out", tmp_path / "instruct.pt", "--batch-size", "4", "--eval-batches", "1", "--max-steps", "3",
             "--max-time", "600", "--parallel", "fsdp", "--activation-checkpointing", "--lora-rank", "4", "--no-compile-loss")
    assert open_checkpoint(tmp_path / "instruct.pt", kinds=("instruct",)).metadata["step"] == 3  # merged: a plain model
    assert "test_loss" in json.loads((tmp_path / "instruct.metrics.json").read_text())

    messages = tmp_path / "sms.tsv"
    messages.write_text("".join(f"{'spam' if i % 2 else 'ham'}\t{'win cash now' if i % 2 else 'lunch at noon'} {i}\n"
                                for i in range(80)))
    torchrun("fine_tune_classifier.py", "--data", messages, "--init", "scratch", "--config", micro_config,
             "--out", tmp_path / "classifier.pt", "--batch-size", "4", "--eval-batches", "1", "--max-steps", "3",
             "--parallel", "fsdp")
    assert 0 <= json.loads((tmp_path / "classifier.metrics.json").read_text())["test_accuracy"] <= 1


def test_a_run_the_memory_plan_says_will_not_fit_stops_naming_the_flag(tmp_path, small_corpus, micro_config, monkeypatch):
    import train

    monkeypatch.setattr(loop, "memory_per_process", lambda device: int(0.5 * GB))
    script, *args = map(str, train_args(small_corpus, micro_config, tmp_path / "m.pt", "--max-steps", "1"))
    with pytest.raises(UserError, match="does not fit.*--activation-checkpointing|does not fit.*no flag"):
        train.main(args)
    assert not (tmp_path / "m.pt").exists()


def test_float16_under_fsdp_is_refused_also_for_one_process(tmp_path, small_corpus, micro_config):
    # One process writes the sharded resume state too, and it keeps no gradient scaler.
    import train

    script, *args = map(str, train_args(small_corpus, micro_config, tmp_path / "m.pt", "--max-steps", "1"))
    args[args.index("--dtype") + 1] = "float16"
    with pytest.raises(UserError, match="--parallel fsdp trains in bfloat16 or float32, not float16"):
        train.main([*args, "--parallel", "fsdp"])
    assert not (tmp_path / "m.pt").exists()

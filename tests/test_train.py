import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, run_script
from modules.checkpoint import open_checkpoint, read_checkpoint
from modules.datasets.corpus import load_tokens
from modules.errors import UserError


def micro_train_args(corpus, config, out, *extra):
    return ["train.py", "--data", corpus, "--init", "scratch", "--config", config, "--out", out,
            "--batch-size", "4", "--eval-batches", "2", "--sample-tokens", "0", "--no-compile-loss", *extra]


@pytest.mark.slow
def test_defaults_shortened_produce_checkpoint_plot_metrics_and_falling_loss(tmp_path):
    out = tmp_path / "pretrained.pt"
    result = run_script("train.py", "--max-steps", "20", "--eval-interval", "10", "--eval-batches", "2", "--out", out)
    assert "sample:" in result.stderr + result.stdout
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    first, last = metrics["evaluations"][0], metrics["evaluations"][-1]
    assert metrics["steps"] == 20 and last["val_loss"] < 9.0 < 10.5 < read_checkpoint(out.with_suffix(".last.pt"))["train_state"]["progress"]["step_losses"][0][2]
    assert last["val_loss"] < first["val_loss"] and metrics["train_loss"] == last["train_loss"]
    assert out.with_suffix(".loss.png").stat().st_size > 10_000
    pretrained = open_checkpoint(out, kinds=("lm",))
    assert pretrained.model.config["context_size"] == 256 and pretrained.metadata["step"] == 20


@pytest.mark.slow
def test_two_processes_ddp_or_fsdp_train_and_evaluate_as_one(tmp_path, small_corpus, micro_config):
    # float32: in bfloat16 the two ways of summing a batch's gradients would round differently.
    common = ["--max-steps", "3", "--eval-interval", "3", "--lr", "1e-2", "--dtype", "float32", "--seed", "3"]
    run_script(*micro_train_args(small_corpus, micro_config, tmp_path / "one.pt", *common))
    for parallel in ("ddp", "fsdp"):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             *map(str, micro_train_args(small_corpus, micro_config, tmp_path / f"{parallel}.pt", *common,
                                        "--parallel", parallel))],
            cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    one = read_checkpoint(tmp_path / "one.pt")["model_state_dict"]
    metrics = {name: json.loads((tmp_path / f"{name}.metrics.json").read_text()) for name in ("one", "ddp", "fsdp")}
    for name in ("ddp", "fsdp"):
        two = read_checkpoint(tmp_path / f"{name}.pt")["model_state_dict"]
        # Adam's steps magnify the rounding of near-zero gradients summed in another order: 1e-4.
        assert max((one[key] - two[key]).abs().max().item() for key in one) < 1e-4, name
        # The same samples evaluated, whatever the number of processes: the same losses.
        for key in ("train_loss", "val_loss", "train_bpb", "val_bpb"):
            assert metrics[name][key] == pytest.approx(metrics["one"][key], abs=1e-4), (name, key)


def test_a_few_steps_in_this_process_lower_the_loss_and_write_the_reports(tmp_path, small_corpus, micro_config):
    # The quick tier's training check: the whole loop (step, evaluation, checkpoints, reports) in-process.
    import train

    out = tmp_path / "m.pt"
    script, *args = map(str, micro_train_args(small_corpus, micro_config, out, "--max-steps", "6", "--eval-interval", "3",
                                              "--lr", "1e-2", "--dtype", "float32"))
    train.main(args)
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    first, last = metrics["evaluations"]
    assert metrics["steps"] == 6 and last["val_loss"] < first["val_loss"] and out.with_suffix(".loss.png").is_file()
    assert read_checkpoint(out)["step"] in (3, 6)


@pytest.mark.slow
def test_a_run_of_one_process_imports_only_what_it_runs(tmp_path, small_corpus, micro_config):
    script, *args = map(str, micro_train_args(small_corpus, micro_config, tmp_path / "m.pt", "--max-steps", "1"))
    code = "import sys, train; train.main(sys.argv[1:]); print(*sorted(name for name in sys.modules if name.startswith('modules')))"
    loaded = run_script("-c", code, *args).stdout.split()
    assert "modules.training.loop" in loaded
    for unused in ("modules.training.ddp", "modules.training.fsdp", "modules.training.activation_checkpointing",
                   "modules.speed.int8", "modules.speed.compiled_generation", "modules.download", "modules.pretrained"):
        assert unused not in loaded, unused


def test_the_gpt2_sizes_init_knows_are_those_openai_published():
    from modules.pretrained import MODEL_SIZES
    from modules.training.starting_model import GPT2_SIZES

    assert GPT2_SIZES == MODEL_SIZES  # written twice so that a run from scratch imports no download code


def test_token_cache_is_reused_and_rebuilt_when_the_text_changes(tmp_path, small_corpus):
    tokens = load_tokens(small_corpus)
    cache = small_corpus.with_name("corpus.txt.tokens.bin")
    assert cache.is_file() and isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    built = cache.stat().st_mtime_ns
    load_tokens(small_corpus)
    assert cache.stat().st_mtime_ns == built
    small_corpus.write_text(small_corpus.read_text() + "\nA new line.")
    assert len(load_tokens(small_corpus)) > len(tokens)


def test_folder_and_bin_inputs(tmp_path, small_corpus):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("Hello there.")
    (folder / "b.txt").write_text("General Kenobi.")
    tokens = load_tokens(folder)
    assert 50256 in tokens.tolist()  # files are separated by <|endoftext|>
    binary = tmp_path / "tokens.bin"
    np.array([1, 2, 3], dtype=np.uint16).tofile(binary)
    assert load_tokens(binary).tolist() == [1, 2, 3]


@pytest.mark.slow
def test_corpus_smaller_than_a_context_says_how_much_is_needed(tmp_path, micro_config):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Too short.")
    result = run_script(*micro_train_args(tiny, micro_config, tmp_path / "m.pt"), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "too few for a context of 32" in result.stderr and "needs at least" in result.stderr


@pytest.mark.slow
def test_missing_data_and_resume_without_checkpoint(tmp_path, small_corpus, micro_config):
    result = run_script("train.py", "--data", tmp_path / "nope.txt", check=False)
    assert result.returncode == 1 and "nope.txt does not exist" in result.stderr
    result = run_script(*micro_train_args(small_corpus, micro_config, tmp_path / "m.pt", "--resume"), check=False)
    assert result.returncode == 1 and "nothing to resume" in result.stderr
    with pytest.raises(UserError, match="too few"):
        from modules.datasets.corpus import train_val_windows
        train_val_windows(np.zeros(10, np.uint16), 32, 0.1)


def test_bits_per_byte_of_a_model_that_knows_nothing_is_log2_of_the_vocabulary_per_token():
    import math

    import torch

    from modules.tokenizer import encode, token_byte_lengths
    from train import PretrainingTask

    class Uniform(torch.nn.Module):  # the same logit for every token: a loss of ln(vocab) everywhere
        def forward(self, input_ids):
            return torch.zeros(*input_ids.shape, 50257)

    targets = torch.tensor(encode("The sun.\n\n<|endoftext|>Its heat.")).view(2, -1)
    metrics = PretrainingTask(None, None, {}).metrics(Uniform(), {"input_ids": targets, "targets": targets})
    bits, text_bytes = metrics["bpb"]
    assert text_bytes == token_byte_lengths()[targets].sum().item() == len("The sun.\n\nIts heat.")  # <|endoftext|>: no text
    assert bits / text_bytes == pytest.approx(targets.numel() * math.log2(50257) / text_bytes)


@pytest.mark.slow
def test_the_sample_is_drawn_with_a_fixed_seed_and_lands_in_the_metrics(tmp_path, small_corpus, micro_config):
    out = tmp_path / "m.pt"
    run_script(*micro_train_args(small_corpus, micro_config, out, "--max-steps", "2", "--sample-tokens", "12"))
    first = json.loads(out.with_suffix(".metrics.json").read_text())
    assert first["sample"].startswith("\n") and len(first["sample"]) > 12 and "val_bpb" in first and "train_bpb" in first
    run_script(*micro_train_args(small_corpus, micro_config, tmp_path / "again.pt", "--max-steps", "2", "--sample-tokens", "12"))
    assert json.loads((tmp_path / "again.metrics.json").read_text())["sample"] == first["sample"]


def test_max_time_plans_the_steps_that_fit():
    from modules.training.schedule import TimeBudget

    def first_plan(seconds, step_seconds, evaluation_seconds, step_limit):
        return TimeBudget(seconds, 10, step_limit, evaluation_seconds=evaluation_seconds, clock=lambda: 0.0).plan(0, step_seconds)

    # n steps of 0.1 s with an evaluation of 1 s every 10 steps and at the end: 45 * 0.1 + 5 * 1 = 9.5 s <= 10 s.
    assert first_plan(10.0, 0.1, 1.0, step_limit=1000) == 45
    assert first_plan(10.0, 0.1, 1.0, step_limit=20) == 20  # --max-steps / --epochs still bound it
    assert first_plan(1.0, 5.0, 1.0, step_limit=20) == 1  # always at least one step


@pytest.mark.parametrize("before, after", [(2.4, 1.2), (1.2, 2.4), (0.05, 0.1), (20.0, 2.0)])
def test_the_time_budget_holds_when_the_machine_gets_twice_as_fast_or_as_slow_mid_run(before, after):
    # The loop's calls, on a clock the test moves: each step takes `before` seconds for the first 60 s and
    # `after` from then on; an evaluation (every 200 steps and at the end) takes 6 s.
    from modules.training.schedule import TimeBudget

    now = 0.0
    budget = TimeBudget(160, eval_interval=200, step_limit=100_000, evaluation_seconds=6.0, clock=lambda: now)
    planned, step = budget.plan(0, before), 0
    while step < planned:
        now += before if now < 60 else after
        step += 1
        planned = budget.step_done(step, planned)
        if step % 200 == 0 or step == planned:
            now += 6.0
            budget.evaluated(6.0)
    assert 0.8 * 160 <= now <= 160 + 15, (now, step)


@pytest.mark.slow
def test_resume_under_max_time_keeps_the_plan_and_repeats_the_losses(tmp_path, small_corpus, micro_config, monkeypatch):
    import itertools

    import train
    from modules.training.interrupt import StopRequest
    from modules.training.loop import Trainer
    from modules.training.schedule import TimeBudget

    script, *args = map(str, micro_train_args(small_corpus, micro_config, tmp_path / "whole.pt", "--max-time", "60",
                                              "--eval-interval", "3", "--lr", "1e-2"))
    # Whatever the machine's pace, 70 steps are planned, each time.
    monkeypatch.setattr(TimeBudget, "plan", lambda self, step, step_seconds: 70)
    train.main(args)
    whole = read_checkpoint(tmp_path / "whole.last.pt")["train_state"]["progress"]
    assert whole["planned_steps"] == 70 == len(whole["step_losses"])

    cut = [arg.replace("whole.pt", "cut.pt") for arg in args]
    with monkeypatch.context() as patch:  # Ctrl-C after step 40
        steps = itertools.count(1)  # asked after each step
        patch.setattr(StopRequest, "requested_anywhere", lambda self, parallel, device: next(steps) == 40)
        with pytest.raises(KeyboardInterrupt):
            train.main(cut)
    monkeypatch.setattr(Trainer, "rehearsed_pace", lambda self: pytest.fail("a resumed run does not rehearse again"))
    train.main([*cut, "--resume"])
    resumed = read_checkpoint(tmp_path / "cut.last.pt")["train_state"]["progress"]
    assert [loss for *_, loss in resumed["step_losses"]] == pytest.approx([loss for *_, loss in whole["step_losses"]], abs=1e-6)


def test_learning_rate_warms_up_then_decays_or_stays():
    from modules.training.schedule import learning_rate_factor

    assert [learning_rate_factor(step, 4, 100) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate_factor(99, 4, 100) == pytest.approx(0.1, abs=1e-3)  # cosine down to a tenth
    assert learning_rate_factor(99, 4, 100, "constant") == 1.0 == learning_rate_factor(4, 0, 100, "constant")


@pytest.mark.slow
def test_bfloat16_training_follows_float32(tmp_path, small_corpus, micro_config):
    # Autocast computes the matrix products in bfloat16 (3 significant digits) and the loss in float32:
    # the run must learn as the float32 one does, its losses within a few percent all the way.
    losses = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.pt"
        result = run_script(*micro_train_args(small_corpus, micro_config, out, "--max-steps", "40",
                                              "--eval-interval", "40", "--lr", "1e-2", "--dtype", dtype))
        assert f"precision: {dtype}" in result.stdout + result.stderr
        progress = read_checkpoint(out.with_suffix(".last.pt"))["train_state"]["progress"]
        losses[dtype] = np.array([loss for _, _, loss in progress["step_losses"]])
    assert losses["float32"][-1] < 0.7 * losses["float32"][0]  # it learned: the comparison means something
    relative = np.abs(losses["bfloat16"] - losses["float32"]) / losses["float32"]
    assert 0 < relative.max() < 0.05, relative  # 0 would mean bfloat16 was never used


def test_max_steps_alone_runs_the_same_steps_on_every_machine():
    import train
    from modules.training.settings import TrainingSettings

    def max_time(*flags):
        return TrainingSettings.from_args(train.parse_args(list(flags))).max_time

    assert max_time() == 160  # the default run: about 3 minutes
    assert max_time("--max-steps", "5000") is None  # no time budget cuts a number of steps short
    assert max_time("--max-steps", "5000", "--max-time", "30") == 30 == max_time("--max-time", "30")


def test_each_setting_is_one_field_that_makes_its_flag_and_checks_its_range():
    import argparse
    from dataclasses import fields

    from modules.training.settings import TrainingSettings, add_training_args

    parser = argparse.ArgumentParser()
    add_training_args(parser, lr=1e-3, max_time=60)
    args = parser.parse_args([])
    for setting in fields(TrainingSettings):  # every field is a flag, its default the field's unless overridden
        assert getattr(args, setting.name) == (1e-3 if setting.name == "lr" else setting.default), setting.name
    assert TrainingSettings.from_args(args).max_time == 60
    with pytest.raises(UserError, match=r"^--micro-batch-size must be >= 1, not 0$"):
        TrainingSettings.from_args(parser.parse_args(["--micro-batch-size", "0"]))
    with pytest.raises(UserError, match="--lr-schedule must be one of cosine, constant"):
        TrainingSettings(out="m.pt", lr_schedule="linear")
    with pytest.raises(TypeError, match="no such setting"):
        add_training_args(argparse.ArgumentParser(), learning_rate=1e-3)
    switched_on = argparse.ArgumentParser()  # a script's default True holds, and --no-compile turns it off
    add_training_args(switched_on, compile=True)
    assert switched_on.parse_args([]).compile and not switched_on.parse_args(["--no-compile"]).compile

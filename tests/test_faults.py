"""The bad-input and fault matrix: every mistake a user can make ends in one clear message and loses nothing.

Each test names its row of the matrix (see the README's Troubleshooting section)."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import MICRO_CONFIG, REPO, run_script
from modules import GPTModel
from modules.checkpoint import open_checkpoint, read_checkpoint, save_checkpoint

pytestmark = pytest.mark.slow  # not in the quick tier (python -m pytest -m "not slow")


def assert_clear_failure(result, *phrases):
    """Exit status 1, each phrase in the message, no traceback."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, f"{phrase!r} not in:\n{result.stderr}"


def train_args(corpus, config, out, *extra):
    return ["train.py", "--data", corpus, "--config", config, "--out", out, "--batch-size", "4",
            "--eval-batches", "1", "--sample-tokens", "0", *extra]


@pytest.fixture
def micro_checkpoints(tmp_path, micro_config):
    save_checkpoint(tmp_path / "lm.pt", GPTModel(MICRO_CONFIG), "lm")
    save_checkpoint(tmp_path / "classifier.pt", GPTModel({**MICRO_CONFIG, "num_classes": 2}), "classifier",
                    label_names=["ham", "spam"], max_length=32)
    return tmp_path


# Row 1: --init / --checkpoint path missing
def test_row1_missing_init_path_names_it_and_how_to_make_one(tmp_path, small_corpus, micro_config):
    result = run_script(*train_args(small_corpus, micro_config, tmp_path / "m.pt", "--init", tmp_path / "missing.pt"), check=False)
    assert_clear_failure(result, "missing.pt", "scratch")


# Row 2: truncated or foreign checkpoint
def test_row2_truncated_checkpoint_is_named_and_left_as_it_was(tmp_path, small_corpus, micro_config, micro_checkpoints):
    broken = tmp_path / "broken.pt"
    broken.write_bytes((micro_checkpoints / "lm.pt").read_bytes()[:5000])
    before = broken.read_bytes()
    result = run_script(*train_args(small_corpus, micro_config, tmp_path / "m.pt", "--init", broken), check=False)
    assert_clear_failure(result, "broken.pt", "not a readable checkpoint")
    assert broken.read_bytes() == before


# Row 3: a checkpoint of the wrong kind
def test_row3_classifier_given_to_train_says_which_kind(tmp_path, small_corpus, micro_config, micro_checkpoints):
    result = run_script(*train_args(small_corpus, micro_config, tmp_path / "m.pt", "--init", micro_checkpoints / "classifier.pt"), check=False)
    assert_clear_failure(result, "'classifier' checkpoint", "'lm' or 'instruct'")


# Row 4: a pickle that would run code
class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_row4_malicious_pickle_is_refused_and_nothing_runs(tmp_path, small_corpus, micro_config):
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"config": _RunsCode(), "kind": "lm", "model_state_dict": {}}, protocol=2))
    # Run from tmp_path, so that a "touch pwned" that ran would leave its file there.
    args = train_args(small_corpus, micro_config, tmp_path / "m.pt", "--init", evil)
    result = run_script(REPO / "train.py", *args[1:], cwd=tmp_path, check=False)
    assert_clear_failure(result, "refused", "evil.pt")
    assert not (tmp_path / "pwned").exists()


# Row 6: the process killed while writing a checkpoint
def test_row6_sigkill_during_checkpoint_writes_keeps_the_previous_one(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, GPTModel(MICRO_CONFIG), "lm", step=0)
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import itertools, sys\nfrom modules import GPTModel\nfrom modules.checkpoint import save_checkpoint\n"
         f"from tests.conftest import MICRO_CONFIG\nmodel = GPTModel(MICRO_CONFIG)\nprint('writing', flush=True)\n"
         f"for step in itertools.count(1):\n    save_checkpoint({str(path)!r}, model, 'lm', step=step)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    time.sleep(1.5)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert open_checkpoint(path).kind == "lm"  # whole: the old one or a complete new one


# Row 12: a corpus smaller than one context window
def test_row12_tiny_corpus_says_how_much_text_is_needed(tmp_path, micro_config):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("Short.")
    result = run_script(*train_args(corpus, micro_config, tmp_path / "m.pt"), check=False)
    assert_clear_failure(result, "too few for a context of 32", "needs at least")


# Row 13: prompts that are empty, too long, or not ASCII
def test_row13_odd_sample_prompts_in_train(tmp_path, small_corpus, micro_config):
    for prompt in ("", "🙂 Ünïcödé " * 40):
        run_script(*train_args(small_corpus, micro_config, tmp_path / "m.pt", "--max-steps", "1", "--sample-tokens", "3",
                               "--sample-prompt", prompt))


# Row 14: --config unknown or inconsistent
def test_row14_bad_configs_list_names_and_constraint(tmp_path, small_corpus):
    result = run_script(*train_args(small_corpus, "huge", tmp_path / "m.pt"), check=False)
    assert_clear_failure(result, "unknown config 'huge'", "124M, 355M, 774M, 1558M, tiny, small")
    bad = tmp_path / "bad.json"
    bad.write_text('{"embedding_dim": 100, "num_heads": 3}')
    result = run_script(*train_args(small_corpus, bad, tmp_path / "m.pt"), check=False)
    assert_clear_failure(result, "divisible by num_heads")


# Row 15: --device cuda without CUDA
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_row15_cuda_without_cuda_names_the_available_devices(tmp_path, small_corpus, micro_config):
    result = run_script(*train_args(small_corpus, micro_config, tmp_path / "m.pt", "--device", "cuda"), check=False)
    assert_clear_failure(result, "CUDA is not available", "cpu")


# Row 17: two processes writing the same output
def test_row17_second_training_on_the_same_out_refuses(tmp_path, small_corpus, micro_config):
    out = tmp_path / "m.pt"
    first = subprocess.Popen([sys.executable, *map(str, train_args(small_corpus, micro_config, out, "--max-steps", "100000",
                                                                 "--eval-interval", "1"))],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not out.with_suffix(".last.pt").exists() and time.time() < deadline:
            time.sleep(0.05)
        result = run_script(*train_args(small_corpus, micro_config, out, "--max-steps", "1"), check=False)
        assert_clear_failure(result, f"process {first.pid}", "choose another output")
    finally:
        first.kill()
        first.wait()


# Row 18: more ranks than batches
def test_row18_torchrun_with_more_ranks_than_samples_is_a_clear_error(tmp_path, small_corpus, micro_config):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         *map(str, train_args(small_corpus, micro_config, tmp_path / "m.pt", "--batch-size", "1"))],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    # torchrun reports the failed workers its own way; each worker says what is wrong.
    assert result.returncode != 0
    assert "error: --batch-size 1 must be a positive multiple of the number of processes (2)" in result.stderr


# Row 5: Ctrl-C in the middle of each training script, then --resume
def _fine_tuning_args(script, tmp_path, small_corpus, micro_config):
    if script == "train.py":
        return train_args(small_corpus, micro_config, tmp_path / "m.pt")
    if script == "fine_tune_classifier.py":
        data = tmp_path / "sms.tsv"
        data.write_text("".join(f"{'spam' if i % 2 else 'ham'}\t{'win cash now' if i % 2 else 'lunch at noon'} {i}\n"
                                for i in range(120)))
    else:
        data = tmp_path / "instructions.json"
        data.write_text(json.dumps([{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))}
                                    for i in range(1, 80)]))
    return [script, "--data", data, "--init", "scratch", "--config", micro_config, "--out", tmp_path / "m.pt",
            "--batch-size", "4", "--eval-batches", "1"]


@pytest.mark.parametrize("script", ["train.py", "fine_tune_classifier.py", "fine_tune_instructional.py"])
def test_row5_ctrl_c_saves_and_resume_repeats_the_uninterrupted_losses(tmp_path, small_corpus, micro_config, script):
    steps = ["--max-steps", "24", "--eval-interval", "2"]
    whole_dir, cut_dir = tmp_path / "whole", tmp_path / "cut"
    whole_dir.mkdir(), cut_dir.mkdir()
    run_script(*_fine_tuning_args(script, whole_dir, small_corpus, micro_config), *steps)
    whole = read_checkpoint(whole_dir / "m.last.pt")["train_state"]["progress"]["step_losses"]

    args = [*_fine_tuning_args(script, cut_dir, small_corpus, micro_config), *steps]
    process = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (cut_dir / "m.last.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("training finished before the interrupt arrived")
    assert process.returncode == 130 and "--resume" in stdout + stderr and "Traceback" not in stderr
    assert read_checkpoint(cut_dir / "m.last.pt")["step"] < 24

    run_script(*args, "--resume")
    resumed = read_checkpoint(cut_dir / "m.last.pt")["train_state"]["progress"]["step_losses"]
    assert [step for step, *_ in resumed] == list(range(1, 25))
    assert [loss for *_, loss in resumed] == pytest.approx([loss for *_, loss in whole], abs=1e-6)


# Row 7: no network for the downloads
def _closed_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("script, flag, alternative", [
    ("get_gpt_weights.py", "--base-url", "put them in"),
    ("fine_tune_classifier.py", "--data-url", "--data PATH"),
    ("fine_tune_instructional.py", "--data-url", "--data PATH"),
])
def test_row7_no_network_names_the_url_and_the_local_alternative(tmp_path, script, flag, alternative):
    url = f"http://127.0.0.1:{_closed_port()}/files"
    where = ["--models-dir", tmp_path / "gpt2"] if script == "get_gpt_weights.py" else ["--data-dir", tmp_path / "data"]
    result = run_script(script, flag, url, *where, "--out" if script != "get_gpt_weights.py" else "--save", tmp_path / "m.pt",
                        check=False, timeout=300)
    assert_clear_failure(result, url, alternative)
    assert not (tmp_path / "m.pt").exists()


def test_row13_classify_empty_long_and_emoji_messages(micro_checkpoints):
    result = run_script("fine_tune_classifier.py", "--checkpoint", micro_checkpoints / "classifier.pt", "--classify",
                        "", "🙂 Ünïcödé " * 100, "plain")
    verdicts = [line for line in result.stdout.splitlines() if "ham" in line or "spam" in line]
    assert len(verdicts) == 3 and "Traceback" not in result.stderr


# Row 19: a number out of range, or a data file with a header and nothing else
@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "-1", "--lr must be > 0, not -1.0"),
    ("--grad-clip", "-1", "--grad-clip must be >= 0 (0 turns it off), not -1.0"),
    ("--eval-batches", "0", "--eval-batches must be >= 1, not 0"),
    ("--batch-size", "0", "--batch-size must be >= 1, not 0"),
])
def test_row19_a_number_out_of_range_names_the_flag(tmp_path, small_corpus, micro_config, flag, value, message):
    result = run_script(*train_args(small_corpus, micro_config, tmp_path / "m.pt", flag, value), check=False)
    assert_clear_failure(result, message)


def test_row19_a_csv_with_a_header_and_no_messages(tmp_path, micro_config):
    empty = tmp_path / "empty.csv"
    empty.write_text("label,text\n")
    result = run_script("fine_tune_classifier.py", "--data", empty, "--init", "scratch", "--config", micro_config,
                        "--out", tmp_path / "c.pt", check=False)
    assert_clear_failure(result, "empty.csv holds a header but no messages")


# Row 20: a pre-tokenized .bin that is not whole uint16 tokens
def test_row20_odd_length_bin_says_it_holds_uint16_tokens(tmp_path, micro_config):
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    result = run_script(*train_args(odd, micro_config, tmp_path / "m.pt"), check=False)
    assert_clear_failure(result, "odd.bin is 3 bytes, an odd number", "uint16")


# Row 21: a JSONL file of one record is one record
def test_row21_one_line_jsonl_is_one_record(tmp_path, micro_config):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    result = run_script("fine_tune_instructional.py", "--data", one, "--init", "scratch", "--config", micro_config,
                        "--out", tmp_path / "i.pt", check=False)
    assert_clear_failure(result, "1 records are too few to split")
    assert "not a list" not in result.stderr


# Row 22: the disk fills up while training writes its checkpoints
def test_row22_a_full_disk_while_training_ends_in_one_line_and_keeps_what_was_written(tmp_path, small_corpus, micro_config):
    from tests.test_files import small_tmpfs

    with small_tmpfs(tmp_path / "disk", "9m") as disk:  # room for one checkpoint of the micro model, not two
        result = run_script(*train_args(small_corpus, micro_config, disk / "m.pt", "--max-steps", "2"), check=False)
        assert_clear_failure(result, "m.last.pt: No space left on device; free some space", "(another --out)")
        assert [path.name for path in disk.iterdir()] == ["m.pt"]  # the best model whole, no temporary file
        assert read_checkpoint(disk / "m.pt")["kind"] == "lm"

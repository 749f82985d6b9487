"""--preset original repeats the original's experiments (../shared/original): its settings, its splits and
its files. The original's pipeline and values are written out here, with the file and line they come
from, as the reference our scripts are compared with; every run here trains a micro model for a step."""
import importlib
import json
import sys

import pandas as pd
import pytest

import fine_tune_classifier
from modules.checkpoint import open_checkpoint
from modules.datasets.instructions import split_instruction_data
from modules.datasets.sms_spam import balance, read_messages, split
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.slow  # not in the quick tier (python -m pytest -m "not slow")


def in_process(monkeypatch, script, *args):
    """Run a script's main() here, as `python script.py args` would."""
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *map(str, args)])
    return importlib.import_module(script).main()


def parsed(monkeypatch, script, *args):
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *args])
    return importlib.import_module(script).parse_args()


# ----------------------------------------------------------------------------- the settings
def test_the_presets_hold_the_originals_settings_and_explicit_flags_win(monkeypatch):
    tuning = parsed(monkeypatch, "fine_tune_instructional", "--preset", "original")
    # fine_tune_instructional.py lines 17, 22-28 (data), 48-54 (model, batch), 75-78 (optimizer, evaluation).
    assert (tuning.init, tuning.limit, tuning.split_order, tuning.batch_size, tuning.lr, tuning.weight_decay,
            tuning.epochs, tuning.eval_interval, tuning.eval_batches) == ("774M", 10000, "file", 2, 2e-5, 0.1, 5, 50, 50)
    assert (tuning.val_fraction, tuning.test_fraction, tuning.mask_prompt) == (0.1, 0.1, False)
    answering = parsed(monkeypatch, "evaluate_responses", "--preset", "original")
    # evaluate_responses.py lines 54, 58; utils.py line 74 (generate_text_v2's temperature=1.0, top_k=None).
    assert (answering.num, answering.temperature, answering.top_k, answering.max_new_tokens) == (200, 1.0, None, 256)
    spam = fine_tune_classifier.parse_args(["--preset", "original"])
    # fine_tune_classifier.py lines 72 (read_csv), 77 and 82 (random_state), 222, 245, 280-284.
    assert (spam.quoting, spam.seed, spam.init, spam.batch_size, spam.lr, spam.weight_decay, spam.epochs,
            spam.eval_interval, spam.eval_batches) == ("pandas", 123, "774M", 8, 5e-5, 0.1, 5, 50, 5)
    for args in (tuning, spam):  # train.py train_model and fine_tune_classifier.py train_model: plain AdamW steps
        assert (args.warmup_steps, args.grad_clip, args.dtype) == (0, 0.0, "float32")

    mine = fine_tune_classifier.parse_args(["--preset", "original", "--lr", "1e-3", "--init", "scratch"])
    assert (mine.lr, mine.init, mine.batch_size) == (1e-3, "scratch", 8)
    assert fine_tune_classifier.parse_args([]).init == "124M"  # without the preset, our defaults


def test_help_says_what_the_preset_does_differently(capsys):
    with pytest.raises(SystemExit):
        fine_tune_classifier.parse_args(["--preset", "original", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--init INIT starting weights" in help_text and "(default: 774M)" in help_text
    assert "(--preset original: --warmup-steps 0)" in help_text  # a default described in words
    assert "classified at its last real token" in help_text


# ----------------------------------------------------------------------------- instruction tuning
def original_instruction_split(records):
    """fine_tune_instructional.py lines 22-28: no shuffle; training, then test, then validation."""
    train_split, test_split = int(len(records) * 0.8), int(len(records) * 0.1)
    return (records[:train_split], records[train_split + test_split:], records[train_split:train_split + test_split])


@pytest.mark.parametrize("size", [50, 1103, 10000])
def test_the_file_order_split_is_the_originals(size):
    records = [{"instruction": f"Task {i}.", "input": "", "output": f"{i}"} for i in range(size)]
    assert split_instruction_data(records, 123, (0.8, 0.1, 0.1), "file") == original_instruction_split(records)


def test_preset_tuning_then_answering_answers_the_originals_test_records_in_order(tmp_path, monkeypatch, micro_config):
    records = [{"instruction": f"Repeat the word number {i}.", "input": "", "output": f"number {i}"} for i in range(50)]
    data, out, answers = tmp_path / "alpaca_data_10k.json", tmp_path / "instruct.pt", tmp_path / "responses.json"
    data.write_text(json.dumps(records))
    in_process(monkeypatch, "fine_tune_instructional", "--preset", "original", "--data", data, "--init", "scratch",
               "--config", micro_config, "--out", out, "--max-steps", "1", "--eval-batches", "1", "--sample-tokens", "0")
    assert open_checkpoint(out).metadata["data"]["split_order"] == "file"
    in_process(monkeypatch, "evaluate_responses", "--preset", "original", "--checkpoint", out, "--out", answers,
               "--max-new-tokens", "4")
    answered = json.loads(answers.read_text())
    assert [entry["instruction"] for entry in answered] == [entry["instruction"] for entry in records[40:45]]
    assert all(entry["generation"]["temperature"] == 1.0 for entry in answered)


# ----------------------------------------------------------------------------- spam classification
def original_spam_splits(path):
    """fine_tune_classifier.py lines 72, 75-89 and 209: read, balance, map the labels, shuffle, cut."""
    frame = pd.read_csv(path, sep="\t", header=None, names=["Label", "Text"])
    num_spam = frame[frame["Label"] == "spam"].shape[0]
    ham_subset = frame[frame["Label"] == "ham"].sample(num_spam, random_state=123)
    balanced = pd.concat([ham_subset, frame[frame["Label"] == "spam"]])
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1})
    shuffled = balanced.sample(frac=1, random_state=123).reset_index(drop=True)
    train_end = int(len(shuffled) * 0.7)
    validation_end = train_end + int(len(shuffled) * 0.1)
    return shuffled[:train_end], shuffled[train_end:validation_end], shuffled[validation_end:]


def test_the_spam_preset_writes_the_originals_splits(tmp_path, micro_config):
    path = SHARED_DATA / "SMSSpamCollection"
    if not path.is_file():
        print(f"skipped: {path} is absent")
        pytest.skip(f"{path} is absent")
    out = tmp_path / "classifier.pt"
    fine_tune_classifier.main(["--preset", "original", "--data", str(path), "--init", "scratch",
                               "--config", str(micro_config), "--out", str(out), "--max-steps", "1"])
    originals = original_spam_splits(path)
    for name, original in zip(("train", "validation", "test"), originals):
        ours = pd.read_csv(out.with_name(f"classifier.{name}.csv"), dtype=str, keep_default_na=False)
        assert ours["text"].tolist() == original["Text"].tolist(), name
        assert ours["label"].map({"ham": 0, "spam": 1}).tolist() == original["Label"].tolist(), name
    assert [len(part) for part in originals] == [1045, 149, 300]

    # The figures docs/results.md gives: how the two ways of reading the quotes differ.
    literal, like_pandas = read_messages(path), read_messages(path, quoting="pandas")
    assert (len(literal), len(like_pandas)) == (5574, 5572)
    assert len(set(like_pandas["text"]) - set(literal["text"])) == 53
    default_test = split(balance(literal, 123), 123)[2]
    assert len(set(default_test["text"]) & set(originals[2]["Text"])) == 232


def test_the_originals_csv_files_train(tmp_path, micro_config):
    """Its train.csv: columns Label (0 or 1) and Text, written by to_csv (fine_tune_classifier.py line 211)."""
    rows = [("spam", f'WIN a "free" prize, call {i} now') if i % 2 else ("ham", f"see you at {i}, ok?") for i in range(40)]
    source = tmp_path / "SMSSpamCollection"
    source.write_text("".join(f"{label}\t{text}\n" for label, text in rows))
    original_spam_splits(source)[0].to_csv(tmp_path / "train.csv", index=None)
    out = tmp_path / "classifier.pt"
    fine_tune_classifier.main(["--data", str(tmp_path / "train.csv"), "--init", "scratch", "--config", str(micro_config),
                               "--out", str(out), "--max-steps", "2", "--eval-batches", "1"])
    written = pd.read_csv(out.with_name("classifier.train.csv"))
    assert set(written["label"]) == {"ham", "spam"} and written["text"].str.contains('"free"').any()

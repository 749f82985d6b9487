import http.server
import itertools
import json
import random
import socket
import threading
import zipfile
from functools import partial

import pandas as pd
import pytest
import torch

import fine_tune_classifier
import modules.download
from tests.conftest import MICRO_CONFIG, SHARED_DATA, run_script
from modules.checkpoint import load_checkpoint, open_checkpoint, read_checkpoint, save_checkpoint
from modules.classification import classifier_from_lm, encode_for_classification
from modules.errors import UserError
from modules.model import GPTModel
from modules.training.starting_model import initial_model
from modules.training.interrupt import StopRequest
from modules.datasets.sms_spam import balance, fetch_sms_spam, read_messages, split

pytestmark = pytest.mark.slow  # not in the quick tier (python -m pytest -m "not slow")

SPAM_WORDS = "win prize cash claim free urgent reward".split()
HAM_WORDS = "meeting lunch tomorrow see you later home".split()


def toy_messages(spam=60, ham=90, seed=0):
    """Messages that a word or two tell apart: the separable set a classifier must learn."""
    rng = random.Random(seed)
    rows = [("spam", " ".join(rng.choices(SPAM_WORDS, k=rng.randint(2, 8)))) for _ in range(spam)]
    rows += [("ham", " ".join(rng.choices(HAM_WORDS, k=rng.randint(2, 8)))) for _ in range(ham)]
    return rows


def write_tsv(path, rows):
    path.write_text("".join(f"{label}\t{text}\n" for label, text in rows))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short fine-tuning run from scratch on the toy set, shared by the tests that read its outputs."""
    folder = tmp_path_factory.mktemp("classifier")
    data = write_tsv(folder / "toy.tsv", toy_messages())
    config = folder / "micro.json"
    config.write_text(json.dumps(MICRO_CONFIG))
    out = folder / "classifier.pt"
    fine_tune_classifier.main(["--data", str(data), "--init", "scratch", "--config", str(config), "--out", str(out),
                               "--epochs", "3", "--lr", "3e-3", "--eval-batches", "2"])
    return out


def micro_classifier(seed=0):
    torch.manual_seed(seed)
    return classifier_from_lm(GPTModel(MICRO_CONFIG), num_classes=2).eval()


# ----------------------------------------------------------------------------- data
def test_balance_and_seeded_70_10_20_split(tmp_path):
    messages = read_messages(write_tsv(tmp_path / "toy.tsv", toy_messages(spam=60, ham=90)))
    balanced = balance(messages, seed=1)
    assert balanced["label"].value_counts().to_dict() == {"ham": 60, "spam": 60}
    train, val, test = split(balanced, seed=1)
    assert (len(train), len(val), len(test)) == (84, 12, 24)
    assert sorted(pd.concat([train, val, test])["text"]) == sorted(balanced["text"])
    again = split(balance(messages, seed=1), seed=1)
    assert all(first.equals(second) for first, second in zip((train, val, test), again))
    assert not split(balance(messages, seed=2), seed=2)[0].equals(train)
    assert sum(map(len, split(messages, seed=1))) == 150  # --no-balance keeps every message


def test_real_sms_spam_collection_parses_5574_messages_and_splits_1045_149_300():
    path = SHARED_DATA / "SMSSpamCollection"
    if not path.is_file():
        print(f"skipped: {path} is absent")
        pytest.skip(f"{path} is absent")
    messages = read_messages(path)
    assert len(messages) == 5574 and (messages["label"] == "spam").sum() == 747
    assert [len(part) for part in split(balance(messages, 123), 123)] == [1045, 149, 300]


@pytest.mark.parametrize("quoting, content, expected", [
    ("none", "ham\thello\nspam no tab here\n", "line 2: expected a label (ham or spam), a tab, then the message; found no tab"),
    ("none", "ham\thello\n\nham\tthere\nspamm\twin\n", "line 4: expected the label 'ham' or 'spam' (or 0 or 1), found 'spamm'"),
    ("none", "ham\thello\nspam\t  \n", "line 2: the spam message is empty"),
    ("pandas", "ham\thello\nspam\twin\tnow\n", "is not a valid tab-separated file: Error tokenizing data"),
    ("pandas", 'ham\t"hello\n"\nspamm\twin\n', "line 3: expected the label 'ham' or 'spam' (or 0 or 1), found 'spamm'"),
    ("pandas", "ham\thello\nspam\n", "line 2: the spam message is empty"),
])
def test_a_malformed_tsv_names_the_line_and_what_was_expected(tmp_path, quoting, content, expected):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        read_messages(path, quoting)


def test_the_originals_way_of_reading_quotes(tmp_path):
    path = tmp_path / "SMSSpamCollection"
    path.write_text('ham\t"hello" there\nspam\twin\n')
    assert read_messages(path)["text"].tolist() == ['"hello" there', "win"]
    # pandas.read_csv takes the opening quote for CSV quoting and drops the pair, as the original read it.
    assert read_messages(path, quoting="pandas")["text"].tolist() == ["hello there", "win"]


def test_csv_with_label_and_text_columns_and_its_errors(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text('Label,Text\nham,"lunch, then home"\nspam,"win\ncash"\n')
    assert read_messages(good).values.tolist() == [["ham", "lunch, then home"], ["spam", "win\ncash"]]
    bad = tmp_path / "bad.csv"
    bad.write_text('label,text\nspam,"win\ncash"\nham,\n')
    with pytest.raises(UserError, match="bad.csv, line 4: the ham message is empty"):  # line 2 spans two lines
        read_messages(bad)
    (tmp_path / "columns.csv").write_text("kind,message\nham,hi\n")
    with pytest.raises(UserError, match="'label' and 'text' columns"):
        read_messages(tmp_path / "columns.csv")


def serve(folder):
    """An HTTP server on 127.0.0.1 for the files in `folder`; returns (server, base URL, list of paths asked)."""
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", requests


def test_download_extracts_uci_zip_once(tmp_path):
    served = tmp_path / "server"
    served.mkdir()
    with zipfile.ZipFile(served / "sms.zip", "w") as archive:
        archive.writestr("SMSSpamCollection", "ham\tsee you at lunch\nspam\tWIN cash now\n")
        archive.writestr("readme", "UCI")
    server, url, requests = serve(served)
    try:
        data_dir = tmp_path / "data"
        path = fetch_sms_spam(data_dir, f"{url}/sms.zip")
        assert path == data_dir / "SMSSpamCollection" and read_messages(path)["label"].tolist() == ["ham", "spam"]
        assert fetch_sms_spam(data_dir, f"{url}/sms.zip") == path and len(requests) == 1
    finally:
        server.shutdown()


def test_no_network_names_the_url_and_the_local_alternative(tmp_path, monkeypatch):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/sms+spam+collection.zip"
    monkeypatch.setattr(modules.download.time, "sleep", lambda seconds: None)  # no waiting between retries
    with pytest.raises(UserError) as error:
        fine_tune_classifier.main(["--data-url", url, "--data-dir", str(tmp_path), "--out", str(tmp_path / "c.pt")])
    assert f"could not download {url}" in str(error.value) and "--data PATH" in str(error.value)
    assert not list(tmp_path.iterdir())  # no partial file left behind


# ----------------------------------------------------------------------------- model
def test_a_padded_batch_classifies_each_message_as_it_does_alone():
    model = micro_classifier()
    task = fine_tune_classifier.ClassifierTask([], [], max_length=32)
    samples = [("win a prize now, call this number to claim your cash", 1), ("lunch?", 0), ("see you tomorrow at the meeting", 0)]
    batch = task.collate(samples)
    assert batch["input_ids"].shape[1] > batch["lengths"].min()  # there is padding to get wrong
    together, _ = task.logits_and_targets(model, batch)
    for row, sample in enumerate(samples):
        torch.testing.assert_close(together[row], task.logits_and_targets(model, task.collate([sample]))[0][0])
    padded_position = model(batch["input_ids"])[1, -1]
    assert not torch.allclose(padded_position, together[1])


def test_truncation_to_max_length_keeps_the_start():
    ids, lengths = encode_for_classification(["one two three four five six", "hi"], max_length=3)
    assert ids.shape == (2, 3) and lengths.tolist() == [3, 1]


def test_init_from_an_lm_checkpoint_keeps_its_weights_and_trains_the_last_block_by_default(tmp_path, micro_config):
    torch.manual_seed(0)
    lm = GPTModel({**MICRO_CONFIG, "num_layers": 2})
    save_checkpoint(tmp_path / "lm.pt", lm, "lm")
    args = fine_tune_classifier.parse_args(["--init", str(tmp_path / "lm.pt")])
    model = fine_tune_classifier.as_classifier(initial_model(args.init), args)
    assert model.config["num_classes"] == 2 and model.out_head.weight.shape == (2, MICRO_CONFIG["embedding_dim"])
    torch.testing.assert_close(model.blocks[0].attention.qkv_proj.weight, lm.blocks[0].attention.qkv_proj.weight)
    torch.testing.assert_close(model.token_embedding.weight, lm.token_embedding.weight)
    trainable = {name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("blocks") else "")
                 for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == {"blocks.1", "final_norm", "out_head"}  # as the original (fine_tune_classifier.py lines 256-265)
    args = fine_tune_classifier.parse_args(["--init", "scratch", "--config", str(micro_config)])
    scratch = fine_tune_classifier.as_classifier(initial_model(args.init, args.config), args)
    assert all(parameter.requires_grad for parameter in scratch.parameters())  # nothing pretrained to keep


# ----------------------------------------------------------------------------- training and its outputs
def test_training_learns_a_separable_set_and_writes_metrics_splits_and_plot(trained):
    metrics = json.loads(trained.with_suffix(".metrics.json").read_text())
    for name in ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "test_accuracy"):
        assert 0.0 <= metrics[name] <= (1.0 if "accuracy" in name else 10.0), name
    assert metrics["test_accuracy"] >= 0.9 and metrics["train_accuracy"] >= 0.9  # chance is 0.5
    assert len(metrics["evaluations"]) == 3 and "val_accuracy" in metrics["evaluations"][0]  # once per epoch
    assert trained.with_suffix(".loss.png").stat().st_size > 10_000
    sizes = {name: len(pd.read_csv(trained.with_name(f"classifier.{name}.csv"))) for name in ("train", "validation", "test")}
    assert sizes == {"train": 84, "validation": 12, "test": 24}
    metadata = open_checkpoint(trained, kinds=("classifier",)).metadata
    assert metadata["label_names"] == ["ham", "spam"] and 2 <= metadata["max_length"] <= 32


def test_classify_from_the_command_line_and_the_wrong_kind(trained, tmp_path):
    result = run_script("fine_tune_classifier.py", "--checkpoint", trained, "--device", "cpu",
                        "--classify", "win cash prize now", "see you at lunch tomorrow")
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("spam (") and lines[0].endswith("%): win cash prize now")
    assert lines[1].startswith("ham (")
    save_checkpoint(tmp_path / "lm.pt", GPTModel(MICRO_CONFIG), "lm")
    result = run_script("fine_tune_classifier.py", "--checkpoint", tmp_path / "lm.pt", "--classify", "hi", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "'lm' checkpoint" in result.stderr and "'classifier'" in result.stderr


def test_lora_checkpoints_load_as_plain_models_and_resume_exactly(tmp_path, micro_config, monkeypatch):
    data = write_tsv(tmp_path / "toy.tsv", toy_messages())
    common = ["--data", str(data), "--init", "scratch", "--config", str(micro_config), "--lora-rank", "2",
              "--lr", "1e-2", "--max-steps", "6", "--eval-interval", "2", "--eval-batches", "1"]
    fine_tune_classifier.main([*common, "--out", str(tmp_path / "whole.pt")])
    whole = read_checkpoint(tmp_path / "whole.last.pt")["train_state"]["progress"]["step_losses"]
    with monkeypatch.context() as patch:  # Ctrl-C after step 3, between two evaluations
        steps = itertools.count(1)  # asked after each step
        patch.setattr(StopRequest, "requested_anywhere", lambda self, parallel, device: next(steps) == 3)
        with pytest.raises(KeyboardInterrupt):
            fine_tune_classifier.main([*common, "--out", str(tmp_path / "cut.pt")])
    fine_tune_classifier.main([*common, "--out", str(tmp_path / "cut.pt"), "--resume"])
    resumed = read_checkpoint(tmp_path / "cut.last.pt")["train_state"]["progress"]["step_losses"]
    assert [loss for *_, loss in resumed] == pytest.approx([loss for *_, loss in whole], abs=1e-6)
    for path in ("whole.pt", "whole.last.pt"):
        model = load_checkpoint(tmp_path / path, kinds=("classifier",))
        assert not any("lora" in type(module).__name__.lower() for module in model.modules())

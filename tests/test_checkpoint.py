import os
import pickle
import subprocess
import sys

import pytest
import torch

from modules import GPTModel, GPT_CONFIGS
from modules.checkpoint import (
    CheckpointError, empty_model, load_checkpoint, model_from_state_dict, open_checkpoint, read_checkpoint,
    save_checkpoint,
)
from modules.classification import classifier_settings, classify
from tests.conftest import REPO

CONFIG = {**GPT_CONFIGS["tiny"], "num_layers": 1, "context_size": 16}


def test_round_trip_keeps_weights_config_kind_and_metadata(tmp_path):
    model = GPTModel(CONFIG)
    path = tmp_path / "sub" / "model.pt"
    save_checkpoint(path, model, "lm", step=7, optimizer_state_dict={"state": {}}, train_state={"step": 7})
    loaded = open_checkpoint(path)
    assert loaded.kind == "lm" and loaded.metadata == {"step": 7}  # no optimizer or training state
    assert not loaded.model.training and loaded.model.config == model.config
    assert loaded.model.out_head.weight is loaded.model.token_embedding.weight
    ids = torch.randint(0, 50257, (1, 8))
    assert torch.equal(loaded.model(ids), model.eval()(ids))
    assert torch.equal(load_checkpoint(path)(ids), loaded.model(ids))  # the model alone, as before
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["model.pt"]  # no temporary left behind


def test_a_classifier_checkpoint_brings_its_labels_and_max_length(tmp_path):
    torch.manual_seed(0)
    model = GPTModel({**CONFIG, "num_classes": 2})
    with torch.no_grad():
        model.out_head.bias.copy_(torch.tensor([0.0, 5.0]))  # says "spam" to anything
    save_checkpoint(tmp_path / "spam.pt", model, "classifier", label_names=["ham", "spam"], max_length=4)
    loaded = open_checkpoint(tmp_path / "spam.pt", kinds=("classifier",))
    assert loaded.kind == "classifier" and loaded.metadata == {"label_names": ["ham", "spam"], "max_length": 4}
    label, probability = classify(loaded.model, "win a prize now", **classifier_settings(loaded.metadata))
    assert label == "spam" and probability > 0.9
    assert classify(loaded.model, "win a prize now")[0] == "1"  # without the names: the class number
    # max_length cuts the message: only its first 4 tokens are read.
    long = "win a prize now, call today, it is free"
    assert classify(loaded.model, long, max_length=4) == classify(loaded.model, "win a prize now", max_length=4)


def test_a_model_built_around_weights_draws_no_random_numbers():
    weights = GPTModel(CONFIG).state_dict()
    torch.manual_seed(0)
    model = model_from_state_dict(CONFIG, weights)
    drawn_after_building = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(drawn_after_building, torch.rand(3))  # building drew no random number
    assert model.out_head.weight is model.token_embedding.weight  # tied again after assign=True
    assert all(tensor.data_ptr() == weights[name].data_ptr() for name, tensor in model.state_dict().items())  # no copies
    assert not any(p.is_meta for p in model.parameters())
    assert all(p.is_meta for p in empty_model(CONFIG).parameters())


def test_loading_needs_neither_the_speed_package_nor_the_compiler():
    code = ("import sys, torch\n"
            "from modules.checkpoint import model_from_state_dict\n"
            "from modules.classification import classify\n"
            "from modules.pretrained import load_gpt2\n"
            "from modules.model import GPTModel\n"
            f"config = {CONFIG!r}\n"
            "model_from_state_dict(config, GPTModel(config).state_dict())\n"
            "print(sorted(name for name in sys.modules if name.startswith(('modules.speed', 'torch._dynamo'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_missing_file_names_the_path_and_how_to_make_one(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt does not exist.*train.py"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file_is_reported_and_left_as_it_was(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, GPTModel(CONFIG), "lm")
    data = path.read_bytes()[:1000]
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)
    assert path.read_bytes() == data


def test_foreign_torch_file_and_wrong_kind(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "foreign.pt")
    save_checkpoint(tmp_path / "lm.pt", GPTModel(CONFIG), "lm")
    with pytest.raises(CheckpointError, match="is a 'lm' checkpoint, but this needs 'classifier'"):
        load_checkpoint(tmp_path / "lm.pt", kinds=("classifier",))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"config": _RunsCode()}, protocol=2))
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_checkpoint(path, GPTModel(CONFIG), "lm", step=1)
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(path, GPTModel(CONFIG), "lm", step=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


@pytest.mark.parametrize("data", [b"", b"junk", b"\x80\x02", b"PK\x03\x04junk"])
def test_garbage_is_reported_as_unreadable(tmp_path, data):
    (tmp_path / "garbage.pt").write_bytes(data)
    for mmap in (False, True):
        with pytest.raises(CheckpointError, match="garbage.pt is not a readable checkpoint"):
            read_checkpoint(tmp_path / "garbage.pt", mmap=mmap)


def test_mmap_read_gives_the_same_header(tmp_path):
    save_checkpoint(tmp_path / "model.pt", GPTModel(CONFIG), "classifier", label_names=["ham", "spam"])
    checkpoint = read_checkpoint(tmp_path / "model.pt", kinds=("classifier",), mmap=True)
    assert checkpoint["kind"] == "classifier" and checkpoint["label_names"] == ["ham", "spam"]
    assert checkpoint["config"] == CONFIG

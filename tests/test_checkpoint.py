import os
import pickle

import pytest
import torch

from modules import GPTModel, GPT_CONFIGS
from modules.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint

CONFIG = {**GPT_CONFIGS["tiny"], "num_layers": 1, "context_size": 16}


def test_round_trip_keeps_weights_config_kind_and_metadata(tmp_path):
    model = GPTModel(CONFIG)
    path = tmp_path / "sub" / "model.pt"
    save_checkpoint(path, model, "lm", step=7)
    loaded = load_checkpoint(path)
    assert not loaded.training and loaded.config == model.config and loaded.kind == "lm"
    assert loaded.metadata == {"step": 7}
    assert loaded.out_head.weight is loaded.token_embedding.weight
    ids = torch.randint(0, 50257, (1, 8))
    assert torch.equal(loaded(ids), model.eval()(ids))
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["model.pt"]  # no temporary left behind


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

import errno
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import MICRO_CONFIG, REPO
from modules import GPTModel
from modules.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from modules.datasets.sms_spam import write_splits
from modules.errors import UserError
from modules.files import atomic_write_text, exclusive_output
from modules.results import ResumableResults
from modules.training.reports import last_checkpoint_path, plot_path, plot_training, write_metrics

pytestmark = pytest.mark.slow  # not in the quick tier (python -m pytest -m "not slow")


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "out" / "a.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two" and [p.name for p in path.parent.iterdir()] == ["a.json"]
    open(tmp_path / "plain", "w").close()
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode  # readable by whom open() would allow


def test_second_writer_refuses_while_the_first_runs_and_stale_locks_are_taken_over(tmp_path):
    out = tmp_path / "model.pt"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from modules.files import exclusive_output\n"
         f"with exclusive_output({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"process {holder.pid}.*choose another output"):
            with exclusive_output(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_output(out):  # the holder died without cleaning up: its lock is stale
        assert (tmp_path / "model.pt.lock").is_file()
    assert not (tmp_path / "model.pt.lock").exists()


# ----------------------------------------------------------------------------- the disk refuses a write
REFUSALS = {errno.ENOSPC: "free some space", errno.EROFS: "read-only", errno.EACCES: "permissions"}


def _write_each_kind_of_output(folder):
    """{kind: a function that writes that kind of output in `folder`, the way the project writes it}."""
    model = GPTModel(MICRO_CONFIG)
    messages = pd.DataFrame({"label": ["ham", "spam"], "text": ["lunch?", "win cash"]})
    results = ResumableResults(folder / "answers.json", [1, 2], key=str, keeps=lambda record: True, to_file=list,
                               what="answers")
    return {
        "checkpoint": lambda: save_checkpoint(folder / "model.pt", model, "lm"),
        "resume state": lambda: save_checkpoint(last_checkpoint_path(folder / "model.pt"), model, "lm", step=3,
                                                train_state={"progress": {"step": 3}}),
        "metrics": lambda: write_metrics(folder / "model.pt", {"val_loss": 1.0}),
        "plot": lambda: plot_training(plot_path(folder / "model.pt"), [(1, 100, 2.0)],
                                      [{"step": 1, "tokens_seen": 100, "train_loss": 2.0, "val_loss": 2.1}]),
        "answers and scores": lambda: results.record({0: {"answer": "yes"}}),
        "data splits": lambda: write_splits([messages] * 3, folder / "classifier.pt"),
    }


KINDS_OF_OUTPUT = ["checkpoint", "resume state", "metrics", "plot", "answers and scores", "data splits"]


def _files_written(folder):
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file() and path.name != "corpus.txt"}


@pytest.mark.parametrize("error_number", REFUSALS)
@pytest.mark.parametrize("kind", KINDS_OF_OUTPUT)
def test_a_refused_output_names_the_path_cause_and_remedy_and_keeps_the_file_before(tmp_path, monkeypatch, kind,
                                                                                    error_number):
    write = _write_each_kind_of_output(tmp_path)[kind]
    write()
    before = _files_written(tmp_path)

    def refuse(*args):
        raise OSError(error_number, os.strerror(error_number))

    # The disk is full (or read-only, or not ours) when the written bytes are flushed, and so the
    # rename never comes: what every kind of output goes through, the atomic writer, has to say so.
    monkeypatch.setattr(os, "fsync", refuse)
    with pytest.raises(UserError) as refused:
        write()
    message = str(refused.value)
    assert message.startswith("could not write ") and "\n" not in message
    assert os.strerror(error_number) in message and REFUSALS[error_number] in message and "unchanged" in message
    written = Path(message.removeprefix("could not write ").split(":")[0])
    assert written in before, f"{written} is not the file being written"
    assert _files_written(tmp_path) == before  # unchanged, and no temporary file beside them


def test_torch_saves_runtime_error_over_a_full_disk_is_read_as_the_full_disk(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "model.pt", GPTModel(MICRO_CONFIG), "lm")
    before = (tmp_path / "model.pt").read_bytes()

    def zip_writer_fails(*args, **kwargs):  # how torch.save reports a write that ran out of space
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", zip_writer_fails)
    with pytest.raises(CheckpointError, match="model.pt: No space left on device; free some space"):
        save_checkpoint(tmp_path / "model.pt", GPTModel(MICRO_CONFIG), "lm")
    assert [path.name for path in tmp_path.iterdir()] == ["model.pt"] and (tmp_path / "model.pt").read_bytes() == before


@pytest.mark.parametrize("error_number", REFUSALS)
def test_a_lock_that_cannot_be_taken_names_the_output(tmp_path, monkeypatch, error_number):
    def refuse(*args, **kwargs):
        raise OSError(error_number, os.strerror(error_number))

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(UserError, match=rf"could not write .*model.pt: {os.strerror(error_number)}"):
        with exclusive_output(tmp_path / "model.pt"):
            pass


@contextmanager
def small_tmpfs(folder, size):
    """A tmpfs of `size` mounted at `folder` for the block (Linux, as root), else the test is skipped."""
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs Linux and root")
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"could not mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_real_full_disk_and_a_real_read_only_one(tmp_path):
    model = GPTModel(MICRO_CONFIG)
    with small_tmpfs(tmp_path / "disk", "8m") as disk:  # room for one checkpoint of the micro model, not two
        save_checkpoint(disk / "model.pt", model, "lm", step=1)
        with pytest.raises(CheckpointError, match=r"model.pt: No space left on device; free some space"):
            save_checkpoint(disk / "model.pt", model, "lm", step=2)
        assert [path.name for path in disk.iterdir()] == ["model.pt"]
        assert read_checkpoint(disk / "model.pt")["step"] == 1
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(UserError, match=r"metrics.json: Read-only file system; that file system is read-only"):
            write_metrics(disk / "model.pt", {"val_loss": 1.0})
        assert read_checkpoint(disk / "model.pt")["step"] == 1

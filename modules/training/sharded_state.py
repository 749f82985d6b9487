"""The resume state of a sharded run, written by every process at once with torch.distributed.checkpoint.

Under FSDP no process holds the whole optimizer state (two float32 moments a parameter: 12.5 GB for
GPT-2 1558M), and none should gather it to write one file. With torch.distributed.checkpoint each process
writes its own shards and the main process the index of who wrote what, so a state can be read back by
any number of processes (each reads the pieces of the shards it holds now), also by one process training
the plain model:

    checkpoints/model.last/latest              the name of the newest complete state
    checkpoints/model.last/step-00000120/      its shards (__*.distcp, .metadata) and train_state.pt

The tensors are stored by parameter name (torch.distributed.checkpoint.state_dict), unmerged LoRA
adapters included, so they do not depend on how the model is wrapped. train_state.pt holds the rest:
what the model is, the run's progress, the random generators' state.

Atomic like every other write of the project: the state is written into a temporary folder, renamed when
complete, and only then does `latest` (itself written atomically) name it; an interrupted save leaves the
previous state as `latest`, usable.
"""
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..checkpoint import atomic_save
from ..errors import UserError
from ..files import atomic_write_text
from .resume import check_data_signature, random_state, restore_random_state

LATEST = "latest"
WRITING = ".writing"  # the folder a state is written into before it is complete
TRAIN_STATE = "train_state.pt"


def sharded_state_path(out):
    """checkpoints/model.pt -> checkpoints/model.last, the folder of a sharded run's resume state."""
    return Path(out).with_suffix(".last")


def sharded_train_state(model, progress, data_signature, device):
    """The train_state that save_sharded_state writes beside the shards: what the model is, the loop's
    Progress, the data's signature and the random generators."""
    return {"config": model.config, "progress": asdict(progress), "data_signature": data_signature,
            **random_state(device)}


def restore_sharded_train_state(folder, model, optimizer, data_signature, device):
    """--resume from the newest state in `folder`, written by any number of processes: every process reads
    its shards of the weights and optimizer state, and the random generators' state; returns the run's
    progress there, as a dict of the loop's Progress fields."""
    state_folder, state = read_train_state(folder, model.config)
    check_data_signature(state_folder, state["data_signature"], data_signature)
    load_sharded_state(state_folder, model, optimizer)
    restore_random_state(state, device)
    return state["progress"]


def save_sharded_state(folder, model, optimizer, train_state, process):
    """Write the weights and optimizer state of `model` and `optimizer`, sharded or not, into `folder`, and
    `train_state` (a dict of small values and tensors, the same on every process, with the model's
    "config" and the "progress" dict) beside them. Every process (a TrainingProcess) calls it; each writes
    its own shards."""
    folder = Path(folder)
    writing = folder / WRITING
    if process.is_main:
        shutil.rmtree(writing, ignore_errors=True)  # left by a save that was interrupted
        writing.mkdir(parents=True)
    process.wait_for_main_process()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with _as_one_process_if_alone() as no_dist:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=writing, no_dist=no_dist)
    if process.is_main:
        atomic_save(train_state, writing / TRAIN_STATE)
        name = _new_state_name(folder, train_state["progress"]["step"])
        writing.rename(folder / name)
        atomic_write_text(folder / LATEST, name)
        for older in folder.glob("step-*"):
            if older.name != name:
                shutil.rmtree(older, ignore_errors=True)
    process.wait_for_main_process()  # no process goes on (and saves again) before the state is complete


def read_train_state(folder, config):
    """(the newest complete state's folder, its train_state dict); a UserError when there is none, or when
    it is the state of another model than `config` describes."""
    folder = Path(folder)
    latest = folder / LATEST
    if not latest.is_file():
        raise UserError(f"nothing to resume: {folder} holds no complete training state (--parallel fsdp writes it "
                        "at each evaluation; --parallel ddp writes a .last.pt file instead): resume with the --parallel "
                        "the run had, or drop --resume to start afresh")
    state_folder = folder / latest.read_text().strip()
    try:
        train_state = torch.load(state_folder / TRAIN_STATE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as error:
        raise UserError(f"{state_folder} is not a readable training state ({error}); "
                        "drop --resume to start afresh") from None
    if train_state.get("config") != config:
        raise UserError(f"{state_folder} holds a different model than the one configured now "
                        f"({train_state.get('config')} against {config}); resume with the same --init/--config")
    return state_folder, train_state


def load_sharded_state(state_folder, model, optimizer):
    """Read the weights and optimizer state saved in `state_folder` into `model` and `optimizer`, which
    may be sharded over another number of processes than when they were saved, or not at all. Every
    process calls it. A state of another model ends in a UserError."""
    # The state dicts of the model and optimizer now say which tensors, of which shapes, to read; the
    # optimizer's moments are created (at zero) for that.
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with _as_one_process_if_alone() as no_dist:
            dcp.load(state, checkpoint_id=state_folder, no_dist=no_dist)
    except CheckpointException as error:  # it gathers the errors of every process
        raise UserError(f"{state_folder} holds a different model or optimizer than the one configured now "
                        f"({_cause(error)}); resume with the same --init/--config and LoRA flags") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _new_state_name(folder, step):
    """step-00000120, or step-00000120-1... when a state of that step exists (saved again after Ctrl-C)."""
    name, count = f"step-{step:08d}", 0
    while (folder / name).exists():
        count += 1
        name = f"step-{step:08d}-{count}"
    return name


@contextmanager
def _as_one_process_if_alone():
    """Yields whether this process runs alone (no process group); then torch.distributed.checkpoint reads
    and writes without one, which is meant here and needs no warning."""
    alone = not torch_dist.is_initialized()
    with warnings.catch_warnings():
        if alone:
            warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or uninitialized")
        yield alone


def _cause(error):
    """The first failing process's reason, e.g. "Size mismatch between saved torch.Size([101, 32]) and ..."."""
    exception, _ = next(iter(error.failures.values()))
    return str(exception)

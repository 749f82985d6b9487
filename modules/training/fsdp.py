"""Fully Sharded Data Parallel (FSDP2): each of N processes keeps 1/N of the weights, gradients and
optimizer state, and gathers a block's whole weights only while the block runs.

DDP keeps a whole copy of the model on every process: 16 bytes a parameter with AdamW in float32
(weights, gradients, two moments), 24.9 GB for GPT-2 1558M, more than a 24 GB GPU holds however many
there are. Sharded, each process holds 16/N bytes a parameter, plus the weights of the blocks running
now. As torchtitan shards a transformer:

- each transformer block is one unit: before its forward (and again before its backward) its weights are
  all-gathered, after it they are dropped, and its gradients are reduce-scattered so each process keeps
  the gradient of its own shard;
- the root unit holds what is left: the embeddings, the final LayerNorm and the head. GPT-2's head shares
  its matrix with the token embedding, and a shared matrix must live in exactly one unit (two units
  would each gather and reduce their own copy); the root is the unit that holds both of its users;
- the mixed-precision policy follows --dtype: the weights are gathered and computed in bfloat16 (half
  the bytes to send), the gradients are reduced in float32, and the shards that the optimizer updates,
  with its state, stay float32.

The optimizer, gradient clipping and torch.distributed.checkpoint work on the shards (DTensors) as they
are. What needs the whole model, the one-file checkpoint that every loader reads, is gathered here.

The resume state of a sharded run is written by every process at once with torch.distributed.checkpoint.
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

This file is imported only for --parallel fsdp.
"""
import math
import shutil
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..checkpoint import atomic_save, model_from_checkpoint, model_from_state_dict
from ..errors import UserError
from ..files import atomic_write_text
from ..lora import LoRALinear, has_lora
from ..speed.precision import resolve_dtype
from .ddp import DataParallel
from .parallel import OneProcess
from .resume import check_data_signature, random_state, restore_random_state


class FullySharded(DataParallel):
    """FSDP2 across the processes; with one process the model stays whole, and the resume state is still
    written sharded, so that any number of processes can resume it."""

    def __init__(self, process, settings):
        super().__init__(process, settings)
        shardable_dtype(settings.dtype, process.device)
        self.sharded = process.world_size > 1

    @property
    def memory_strategy(self):
        return "fsdp" if self.sharded else "one process"

    def prepare(self, model):
        model, training_model = OneProcess.prepare(self, model)  # not DDP's wrapper: FSDP shards in place
        if self.sharded:
            shard_model(model, self.settings.dtype, self.process.device)
        return model, training_model

    def gradient_sync(self, training_model, last):
        """FSDP reduce-scatters the gradients after the backward pass of the last micro-batch only."""
        if self.sharded:
            training_model.set_requires_gradient_sync(last)
        return nullcontext()

    def sum(self, tensor):
        return super().sum(tensor) if self.sharded else tensor

    def max(self, tensor):
        return super().max(tensor) if self.sharded else tensor

    def evaluation_chunks(self, count):
        """Every forward pass gathers weights from all processes, so all run as many: one whose share is
        done evaluates the first chunk again, uncounted."""
        rounds = math.ceil(count / self.process.world_size) * self.process.world_size
        return [(index if index < count else 0, index < count)
                for index in range(self.process.rank, rounds, self.process.world_size)]

    def sample(self, model, task):
        """Every process runs the sample's forward passes, as each gathers weights from all."""
        if not self.sharded:
            return super().sample(model, task)
        with root_gathered(model):
            sample = task.sample(model)
        return sample if self.process.is_main else None

    def full_model(self, model):
        """The whole model on the main process's CPU, None on the others; every process must call it."""
        return gathered_model(model) if self.sharded else model

    def best_model(self, model, best):
        """Training is over: every process evaluates the whole best model, unsharded."""
        if not self.sharded:
            return super().best_model(model, best)
        return model_from_checkpoint(best, self.settings.out).to(self.process.device), DataParallel(
            self.process, self.settings)

    def resume_path(self):
        return sharded_state_path(self.settings.out)

    def save_resume_state(self, trainer):
        state = sharded_train_state(trainer.model, trainer.progress, trainer.data_signature, self.process.device)
        save_sharded_state(self.resume_path(), trainer.model, trainer.optimizer, state, self.process)

    def restore_resume_state(self, trainer):
        return restore_sharded_train_state(self.resume_path(), trainer.model, trainer.optimizer,
                                           trainer.data_signature, self.process.device)


def shard_model(model, dtype_name, device):
    """Shard `model` (a GPTModel, LoRA layers included, already on `device`) over the process group, in
    place: one FSDP unit per transformer block, then the root. Returns the model."""
    policy = mixed_precision_policy(dtype_name, device)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def mixed_precision_policy(dtype_name, device):
    """bfloat16 weights and computation with float32 gradient reduction, or float32 throughout."""
    dtype = shardable_dtype(dtype_name, device)
    if dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shardable_dtype(dtype_name, device):
    """The dtype --dtype `dtype_name` stands for, refused when float16: a gradient scaler would have to
    work over the shards, and the sharded resume state (--parallel fsdp writes it with one process too)
    keeps none."""
    dtype = resolve_dtype(dtype_name, device)
    if dtype == torch.float16:
        raise UserError("--parallel fsdp trains in bfloat16 or float32, not float16 (float16 would need a gradient "
                        "scaler over the shards): use --dtype bfloat16 or --dtype float32")
    return dtype


@contextmanager
def root_gathered(model):
    """Within the block, the root unit's weights (the embeddings, the final LayerNorm, the head) are
    gathered, in the computation's precision: generation sizes its KV cache from the token embedding's
    dtype, which must be the one the blocks compute in. Every process must enter it."""
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def gathered_model(model):
    """The whole of a sharded `model` as a plain GPTModel on the CPU of the main process (LoRA layers
    kept, as in `model`), None on the others: what save_checkpoint writes. Every process must call it,
    since each sends its shards. The weights are gathered one tensor at a time into CPU memory, so no
    GPU ever holds the whole model at once."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if not state:  # cpu_offload leaves the gathered tensors on the main process only
        return None
    lora = None
    if has_lora(model):
        layer = next(module for module in model.modules() if isinstance(module, LoRALinear))
        lora = (layer.A.shape[1], layer.scaling * layer.A.shape[1])
    return model_from_state_dict(model.config, state, lora)


# ---------------------------------------------------------------- the resume state, sharded
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

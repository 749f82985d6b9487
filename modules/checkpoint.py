"""One checkpoint format for every script: a dict saved with torch.save.

    {"config": model config, "kind": "lm" | "instruct" | "classifier", "model_state_dict": weights,
     ...whatever the kind needs: label_names, max_length, step, optimizer state for resuming...}

Writes are atomic (a temporary file in the same folder, then a rename), so a crash or a full disk
leaves the previous checkpoint intact. Reads use weights_only=True: a checkpoint can hold tensors
and plain Python values but never code that runs when it is opened.

A model around stored weights is built on the meta device (shapes, no memory) and the stored tensors
become its parameters (load_state_dict(assign=True)): no random initialisation is drawn only to be
overwritten (for GPT-2 124M, 124 million numbers, a second on 2 CPU cores), and no second copy of the
weights is made.
"""
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .config import ConfigError
from .errors import UserError
from .files import atomic_file
from .lora import apply_lora, merged_state_dict
from .model import GPTModel

KINDS = ("lm", "instruct", "classifier")
HOW_TO_MAKE_ONE = (
    "make one with `python train.py`, `python get_gpt_weights.py --model 124M --save checkpoints/gpt2-124M.pt`, "
    "or a fine-tuning script"
)


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, foreign, or of the wrong kind."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A model and what its checkpoint says about it: its kind ("lm", "instruct" or "classifier") and
    the checkpoint's other small entries (label names, max length, step, data settings, LoRA...)."""

    model: GPTModel
    kind: str
    metadata: dict


def unwrap(model):
    """The GPTModel inside DistributedDataParallel and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def save_checkpoint(path, model, kind, **extra):
    """Write `model` (config and weights) plus `extra` entries to `path` atomically.

    LoRA adapters are stored merged into their weights, so the checkpoint loads into a plain GPTModel."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    model = unwrap(model)
    payload = {"config": model.config, "kind": kind, "model_state_dict": merged_state_dict(model), **extra}
    atomic_save(payload, path)


def atomic_save(obj, path):
    """torch.save `obj` to `path` whole or not at all (modules/files.py's atomic_file)."""
    try:
        with atomic_file(path) as file:
            torch.save(obj, file)
    except UserError as error:  # the disk refused the write: the message says where, why and what to do
        raise CheckpointError(str(error)) from None


def read_checkpoint(path, kinds=None, map_location="cpu", mmap=False):
    """The checkpoint dict at `path`, checked to be one of ours (and of one of `kinds`, if given).

    mmap=True maps the weights instead of reading them: cheap when only the config, kind or
    metadata are needed (the app's checkpoint list), whatever the model's size."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; {HOW_TO_MAKE_ONE}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if "GLOBAL" in str(error) or "global" in str(error):  # the pickle names a function or class to call
            raise CheckpointError(
                f"refused to open {path}: it holds Python objects, not just tensors, and loading it could run "
                "code (torch.load weights_only=True). Only open checkpoints written by this project."
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or not a torch.save file)") from None
    except Exception:  # garbage fails anywhere in the unpickler: RuntimeError, EOFError, struct.error...
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or not a torch.save file)") from None
    if not isinstance(checkpoint, dict) or not {"config", "kind", "model_state_dict"} <= checkpoint.keys():
        raise CheckpointError(f"{path} is a torch file but not a checkpoint of this project (no config/kind/model_state_dict)")
    if kinds is not None and checkpoint["kind"] not in kinds:
        raise CheckpointError(
            f"{path} is a {checkpoint['kind']!r} checkpoint, but this needs {' or '.join(repr(k) for k in kinds)}"
        )
    return checkpoint


def model_from_checkpoint(checkpoint, path="checkpoint"):
    """Build the GPTModel a checkpoint dict describes."""
    try:
        return model_from_state_dict(checkpoint["config"], checkpoint["model_state_dict"])
    except (ConfigError, RuntimeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: the weights do not fit the config stored with them ({error})") from None


def open_checkpoint(path, device="cpu", kinds=None):
    """The checkpoint at `path` as a LoadedCheckpoint: its model in eval mode on `device` (its config on
    model.config), its kind, and its metadata (every entry but the config, kind, weights and
    training state)."""
    checkpoint = read_checkpoint(path, kinds)
    model = model_from_checkpoint(checkpoint, path).to(device).eval()
    metadata = {key: value for key, value in checkpoint.items()
                if key not in ("config", "kind", "train_state") and not key.endswith("state_dict")}
    return LoadedCheckpoint(model, checkpoint["kind"], metadata)


def load_checkpoint(path, device="cpu", kinds=None):
    """The model stored at `path`, in eval mode on `device`, its config on model.config
    (open_checkpoint also gives its kind and metadata)."""
    return open_checkpoint(path, device, kinds).model


def model_from_state_dict(config, state_dict, lora=None):
    """A GPTModel of `config` holding the tensors of `state_dict` (no copies), with no random
    initialisation drawn first; with `lora` (rank, alpha), LoRA layers around its matrices, for a state
    dict that holds adapters apart (a training run's)."""
    model = empty_model(config)
    if lora:
        apply_lora(model, *lora)
    model.load_state_dict(state_dict, assign=True)
    if not model.config.get("num_classes"):
        model.tie_weights()  # assign=True gave the head and the token embedding a Parameter each
    return model


def empty_model(config):
    """The model's structure with no weights (parameters on the meta device): shapes at no cost."""
    with torch.device("meta"), _SkipInitialisers():
        return GPTModel(config)


_INITIALISERS = frozenset(
    getattr(nn.init, name) for name in ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")
)


class _SkipInitialisers(TorchFunctionMode):
    """Within this mode (this thread only), nn.init's functions leave their tensor as it is.

    On the meta device there is nothing to initialise, but nn.init.normal_ still runs there, through a
    Python reference implementation whose first call imports torch._dynamo: about 2 s once per process
    on a quiet 2-core machine (8 s on a busy one), several times what loading GPT-2 124M takes. The mode is the
    mechanism `with torch.device("meta")` itself uses."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _INITIALISERS:
            return args[0] if args else kwargs["tensor"]  # nn.init passes its tensor by keyword
        return func(*args, **(kwargs or {}))

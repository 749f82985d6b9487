"""How the processes of a run share the work, chosen once: one object that the loop asks, never a test of
the mode, the number of processes or the rank inside the loop.

Under torchrun every process runs the whole script; RANK, WORLD_SIZE and LOCAL_RANK in the environment say
which one it is, and the processes join one group (NCCL between GPUs, gloo between CPUs). Each way of
sharing the work answers the same questions:

    prepare(model)            the model on this process's device, and the model the steps run (wrapped)
    gradient_sync(model, last) whether this micro-batch's backward pass exchanges gradients (the last one)
    sum(tensor), max(tensor)  over all processes; maxima(values) of a list of floats
    evaluation_chunks(count)  which of an evaluation's chunks this process runs, and which of them count
    sample(model, task)       the task's sample text, on the main process
    save_checkpoint(...)      the whole model in one checkpoint file, written by the main process
    best_model(model, best)   the best checkpoint's weights, for the final evaluation
    save_resume_state / restore_resume_state   what --resume needs

OneProcess answers them for one process; DataParallel (ddp.py) for DDP, each process a whole copy of the
model; FullySharded (fsdp.py) for FSDP2. Each is imported only by a run that uses it.
"""
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from ..checkpoint import save_checkpoint
from ..device import get_device
from ..lora import merge_lora
from .reports import last_checkpoint_path
from .resume import restore_train_state, train_state
from .settings import TrainingSettings


@dataclass
class TrainingProcess:
    """Where this process stands: its rank among `world_size` processes, and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @contextmanager
    def main_process_first(self):
        """The main process runs the block first (a download), then the others (reading it from disk)."""
        if not self.is_main:
            torch_dist.barrier()
        yield
        if self.is_main and self.world_size > 1:
            torch_dist.barrier()

    def wait_for_main_process(self):
        """Sync point, e.g. so that a checkpoint the main process writes is complete before others read it."""
        if self.world_size > 1:
            torch_dist.barrier()


@contextmanager
def training_run(args):
    """Yields (settings, process) for a script's parsed flags: the TrainingSettings (checked) and this
    TrainingProcess, with the random numbers seeded; the process group is left however the block ends."""
    settings = TrainingSettings.from_args(args)
    process = join_processes(settings.device)
    try:
        torch.manual_seed(settings.seed)
        yield settings, process
        # All leave the group together: gloo aborted a process at exit now and then (2 in 72 runs of
        # two processes; none in 120 since) when it left while the main process was still writing its
        # reports. After an error no one waits, since the others may never arrive.
        process.wait_for_main_process()
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def join_processes(device_name=None):
    """This process, in the group of processes when started by torchrun (NCCL on GPUs, gloo on CPU)."""
    device = get_device(device_name)
    if "RANK" not in os.environ:
        return TrainingProcess(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return TrainingProcess(torch_dist.get_rank(), torch_dist.get_world_size(), device)


def choose_parallelism(settings, process):
    """The way this run's processes share the work: --parallel fsdp, else DDP across processes, else one."""
    if settings.parallel == "fsdp":
        from .fsdp import FullySharded  # FSDP and torch.distributed.checkpoint only where asked for
        return FullySharded(process, settings)
    if process.world_size > 1:
        from .ddp import DataParallel
        return DataParallel(process, settings)
    return OneProcess(process, settings)


class OneProcess:
    """One process holds the whole model and does all the work: nothing to exchange."""

    memory_strategy = "one process"  # as the memory plan (memory_plan.py) names it

    def __init__(self, process, settings):
        self.process, self.settings = process, settings

    def prepare(self, model):
        """(the model on this process's device, the model the steps run); both share the weights."""
        model = model.to(self.process.device)
        if self.settings.activation_checkpointing:
            from .activation_checkpointing import checkpoint_activations
            checkpoint_activations(model)
        return model, torch.compile(model) if self.settings.compile else model

    def gradient_sync(self, training_model, last):
        return nullcontext()

    def sum(self, tensor):
        return tensor

    def max(self, tensor):
        return tensor

    def maxima(self, values):
        """The maxima of a list of floats over all processes, e.g. so that all plan the same steps."""
        return self.max(torch.tensor(values, dtype=torch.float64, device=self.process.device)).tolist()

    def evaluation_chunks(self, count):
        """(chunk index, counted) of the chunks of an evaluation this process runs: all of them here."""
        return [(index, True) for index in range(count)]

    def sample(self, model, task):
        return task.sample(model) if self.process.is_main else None

    def save_checkpoint(self, path, model, kind, **entries):
        """The whole model as one checkpoint (modules/checkpoint.py), written by the main process; every
        process calls it."""
        model = self.full_model(model)
        if self.process.is_main:
            save_checkpoint(path, model, kind, **entries)

    def full_model(self, model):
        """The whole model, on the main process."""
        return model

    def best_model(self, model, best):
        """(the model holding the weights of `best`, a checkpoint dict; the parallelism to evaluate it with).
        LoRA adapters are merged first, as the checkpoint holds merged weights."""
        merge_lora(model)
        model.load_state_dict(best["model_state_dict"])
        return model, self

    def resume_path(self):
        return last_checkpoint_path(self.settings.out)

    def save_resume_state(self, trainer):
        """The last checkpoint, with everything --resume needs beside the weights (resume.py)."""
        if self.process.is_main:
            state = train_state(trainer.model, trainer.optimizer, trainer.scaler, trainer.progress,
                                trainer.data_signature, self.process.device)
            save_checkpoint(self.resume_path(), trainer.model, trainer.task.kind, **trainer.checkpoint_entries(),
                            train_state=state)

    def restore_resume_state(self, trainer):
        """Put the last checkpoint's weights, optimizer and random state in place; returns its progress dict."""
        return restore_train_state(self.resume_path(), trainer.task.kind, trainer.model, trainer.optimizer,
                                   trainer.scaler, trainer.data_signature, self.process.device)

"""The start of every training script: checked settings, this process among the others, the seed, the
starting weights; and the clean-up however the script ends."""
from contextlib import contextmanager

import torch

from .distributed import join_processes, leave_processes
from .settings import TrainingSettings
from .starting_weights import initial_model


@contextmanager
def training_run(args):
    """Yields (settings, process) for a script's parsed flags: the TrainingSettings (checked) and the
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
        leave_processes()


def starting_model(args, process, kinds=("lm", "instruct")):
    """The model the flags of add_init_args ask for; a checkpoint must be of one of `kinds`. The main
    process loads it first, so that a download of OpenAI's weights happens once."""
    with process.main_process_first():
        return initial_model(args.init, args.config, kinds, args.models_dir)


def parameter_summary(model):
    """"11,520,000 parameters (450,816 trained)": what a script says about its model before training."""
    total = sum(parameter.numel() for parameter in model.parameters())
    trained = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return f"{total:,} parameters ({trained:,} trained)"

"""The start of every training script: checked settings, this process among the others, the seed, the
starting weights; and the clean-up however the script ends."""
from contextlib import contextmanager

import torch

from .distributed import join_processes, leave_processes
from .settings import TrainingSettings
from .starting_weights import initial_model


@contextmanager
def training_run(args, kinds=("lm", "instruct")):
    """Yields (settings, process, model) for a script's parsed flags (add_training_args and add_init_args):
    the TrainingSettings, the TrainingProcess, and the model --init asks for, a checkpoint of which must be
    of one of `kinds`. The main process loads the model first (a download of OpenAI's weights happens once)."""
    settings = TrainingSettings.from_args(args)
    process = join_processes(settings.device)
    try:
        torch.manual_seed(settings.seed)
        with process.main_process_first():
            model = initial_model(args.init, args.config, kinds, args.models_dir)
        yield settings, process, model
    finally:
        leave_processes()


def parameter_summary(model):
    """"11,520,000 parameters (450,816 trained)": what a script says about its model before training."""
    total = sum(parameter.numel() for parameter in model.parameters())
    trained = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return f"{total:,} parameters ({trained:,} trained)"

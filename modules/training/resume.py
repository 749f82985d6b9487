"""What --resume needs: the state of a run between two steps, saved in the last checkpoint.

Besides the weights: the optimizer's moments, the GradScaler's scale, the random generators (so the next
dropout masks are those an uninterrupted run would draw), and the run's progress. The batches and the
learning rate need nothing more: they follow from the seed, the step number and the planned steps.
"""
import math
from dataclasses import asdict, dataclass, field

import torch

from ..checkpoint import read_checkpoint
from ..errors import UserError
from ..lora import lora_state_dict


@dataclass
class Progress:
    """How far a run has got and what it measured: the loop's state besides the weights and the
    optimizer's."""

    step: int = 0
    planned_steps: int | None = None  # with --max-time: the steps that fit, planned again as the run goes
    warmup_steps: int | None = None  # fixed by the first plan
    seconds_used: float = 0.0  # of --max-time, evaluations included
    evaluation_seconds: float | None = None  # --max-time: what an evaluation takes, as last measured
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    step_losses: list = field(default_factory=list)  # (step, tokens seen, training loss) of every step
    evaluations: list = field(default_factory=list)  # one dict per evaluation
    last_sample: str | None = None  # the task's sample text at the last evaluation


def resumed_progress(saved, path, step_limit):
    """The Progress of a restored state's `saved` dict; a UserError when the run has no step left."""
    progress = Progress(**saved)
    progress.step_losses = [tuple(entry) for entry in progress.step_losses]
    if progress.step >= (progress.planned_steps or step_limit):
        done = (f"the {progress.step} steps its --max-time planned; start a new run to train further"
                if progress.planned_steps else f"{progress.step} steps; raise --max-steps or --epochs to continue")
        raise UserError(f"{path} has already trained {done}")
    return progress


def train_state(model, optimizer, scaler, progress, data_signature, device):
    """The entries a resumable checkpoint adds to the weights; `progress` is the loop's Progress."""
    return {
        "optimizer_state_dict": optimizer.state_dict(),
        "scaler_state_dict": scaler.state_dict() if scaler else None,
        **random_state(device),
        "progress": asdict(progress),
        "data_signature": data_signature,
        # Checkpoints hold LoRA adapters merged into the weights; resuming needs them apart.
        "lora_state_dict": lora_state_dict(model),
    }


def random_state(device):
    """The random generators' state, taken between steps: the one the next step starts from."""
    return {"rng_state": torch.get_rng_state(),
            "cuda_rng_state": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_train_state(path, kind, model, optimizer, scaler, data_signature, device):
    """Load the state saved at `path` into the model, optimizer, scaler and random generators; returns the
    run's progress there, as a dict of the loop's Progress fields."""
    if not path.is_file():
        raise UserError(f"nothing to resume: {path} does not exist (it is written at each evaluation); "
                        "drop --resume to start afresh")
    checkpoint = read_checkpoint(path, kinds=(kind,))
    state = checkpoint.get("train_state")
    if state is None or "progress" not in state:
        raise UserError(f"{path} holds no training state that this version can resume from")
    check_data_signature(path, state["data_signature"], data_signature)
    try:
        model.load_state_dict(state["lora_state_dict"] or checkpoint["model_state_dict"])
    except RuntimeError:
        raise UserError(f"{path} holds a different model than the one configured now; "
                        "resume with the same --init/--config") from None
    optimizer.load_state_dict(state["optimizer_state_dict"])
    if scaler and state["scaler_state_dict"]:
        scaler.load_state_dict(state["scaler_state_dict"])
    restore_random_state(state, device)
    return state["progress"]


def check_data_signature(path, saved, now):
    if saved != now:
        raise UserError(f"{path} was trained with --batch-size {saved['global_batch']} on {saved['train_samples']} "
                        f"samples; resume with the same data and batch size (now {now['global_batch']} and "
                        f"{now['train_samples']})")


def restore_random_state(state, device):
    torch.set_rng_state(state["rng_state"])
    if state["cuda_rng_state"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng_state"], device)

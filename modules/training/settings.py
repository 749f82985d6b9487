"""The settings of a training run: the flags every training script shares, as one typed object.

Each setting is written once, as a field of TrainingSettings: its type, its default, its range and its
help. add_training_args makes the argparse flags from the fields (a script may change a default), and
TrainingSettings checks the ranges when it is built, so a number out of range ends in one line naming
the flag (`--lr must be > 0, not -1.0`), never in a traceback from deep inside the optimizer.
"""
import argparse
import types
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import UserError, check_flag
from ..speed.precision import DTYPES

LR_SCHEDULES = ("cosine", "constant")
PARALLEL_CHOICES = ("ddp", "fsdp")  # modules/training/parallel.py and fsdp.py


def setting(default, help, *, valid=None, must_be=None, choices=None, metavar=None):
    """A field of TrainingSettings and the flag it stands for: `help` (argparse's, %(default)s allowed);
    `valid(value)` with `must_be` saying what it checks, or `choices`."""
    return field(default=default, metadata={"help": help, "valid": valid, "must_be": must_be, "choices": choices,
                                            "metavar": metavar})


def at_least_one(value):
    return value >= 1


def not_negative(value):
    return value >= 0


def positive(value):
    return value > 0


@dataclass(frozen=True)
class TrainingSettings:
    epochs: int = setting(1, "passes over the training set (default: %(default)s)", valid=at_least_one, must_be=">= 1")
    max_steps: int | None = setting(None, "optimizer steps to run; wins over --epochs", valid=at_least_one,
                                    must_be=">= 1")
    max_time: float | None = setting(
        None, "train for this long (start-up excluded), at most --max-steps or --epochs: the steps that fit, and the "
              "learning-rate schedule's end, are planned before the first step and again every few steps from the "
              "measured pace", valid=positive, must_be="> 0 seconds",
        metavar="SECONDS")
    batch_size: int = setting(8, "samples per optimizer step, summed over all processes (default: %(default)s)",
                              valid=at_least_one, must_be=">= 1")
    micro_batch_size: int | None = setting(
        None, "samples per forward pass and process; smaller values trade speed for memory through gradient "
              "accumulation (default: the whole share of a process)", valid=at_least_one, must_be=">= 1")
    lr: float = setting(3e-4, "peak learning rate (default: %(default)s)", valid=positive, must_be="> 0")
    weight_decay: float = setting(0.1, "AdamW weight decay on matrices (default: %(default)s)", valid=not_negative,
                                  must_be=">= 0 (0 turns it off)")
    warmup_steps: int | None = setting(None, "linear warmup before the cosine decay (default: 5%% of the steps)",
                                       valid=not_negative, must_be=">= 0 (0 turns it off)")
    lr_schedule: str = setting("cosine", "after the warmup: cosine decay to a tenth of --lr at the last step, or "
                                         "constant (default: %(default)s)", choices=LR_SCHEDULES)
    grad_clip: float = setting(1.0, "max gradient norm, 0 to disable (default: %(default)s)", valid=not_negative,
                               must_be=">= 0 (0 turns it off)")
    eval_interval: int | None = setting(None, "evaluate (and save) every N steps (default: once per epoch, and at "
                                              "the end)", valid=at_least_one, must_be=">= 1")
    eval_batches: int = setting(10, "batches of the training and validation sets per evaluation (default: "
                                    "%(default)s)", valid=at_least_one, must_be=">= 1")
    dtype: str = setting("auto", "precision of the matrix products (autocast): auto is bfloat16 where the GPU or "
                                 "CPU computes it natively (AMX, AVX512-BF16), else float32 (default: %(default)s)",
                         choices=DTYPES)
    compile: bool = setting(False, "torch.compile the model (faster steps on a GPU, slow start)")
    compile_loss: bool | None = setting(None, "torch.compile the loss: fuses the softmax over the vocabulary, at the "
                                              "cost of a compile at the start (default: a script's own, else on for cpu "
                                              "and cuda, where it was measured faster; modules/speed/compilation.py)")
    parallel: str = setting("ddp", "how the processes of a torchrun share the work: ddp keeps the whole model, its "
                                   "gradients and optimizer state in each; fsdp shards them across the processes, "
                                   "for models that one device cannot hold (default: %(default)s)",
                            choices=PARALLEL_CHOICES)
    activation_checkpointing: bool = setting(False, "keep only each block's input for the backward pass and "
                                                    "recompute the rest: far less memory, a third more compute")
    seed: int = setting(123, "random seed (default: %(default)s)")
    device: str | None = setting(None, "cuda, mps or cpu (default: the best available)")
    out: Path = setting(Path("checkpoints/model.pt"), "checkpoint to write (default: %(default)s)")
    resume: bool = setting(False, "continue from the last checkpoint beside --out")

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        for setting_field in fields(self):
            value, meta = getattr(self, setting_field.name), setting_field.metadata
            if meta["valid"]:
                check_flag(setting_field.name, value, meta["valid"], meta["must_be"])
            if meta["choices"] and value not in meta["choices"]:
                raise UserError(f"--{flag_name(setting_field)} must be one of {', '.join(meta['choices'])}, "
                                f"not {value!r}")
        if self.compile and self.parallel == "fsdp":
            raise UserError("--compile does not work with --parallel fsdp yet: drop one of the two")

    @classmethod
    def from_args(cls, args):
        """The settings among an argparse Namespace's attributes (add_training_args's flags). A script's
        default --max-time applies when neither --max-time nor --max-steps is given: a number of steps
        asks for the same run on every machine."""
        values = {setting_field.name: getattr(args, setting_field.name) for setting_field in fields(cls)}
        if values["max_time"] is None and values["max_steps"] is None:
            values["max_time"] = args.default_max_time
        return cls(**values)

    def as_dict(self):
        """For the checkpoint: plain JSON-able values."""
        return {**asdict(self), "out": str(self.out)}


def add_training_args(parser, **defaults):
    """The flags of TrainingSettings, with a script's own defaults, e.g. `add_training_args(parser, lr=1e-3)`.
    A default --max-time applies only when --max-steps is not given either (TrainingSettings.from_args)."""
    group = parser.add_argument_group("training")
    default_max_time = defaults.pop("max_time", None)
    parser.set_defaults(default_max_time=default_max_time)
    unknown = set(defaults) - {setting_field.name for setting_field in fields(TrainingSettings)}
    if unknown:
        raise TypeError(f"add_training_args: no such setting {sorted(unknown)}")
    for setting_field in fields(TrainingSettings):
        meta = setting_field.metadata
        default = defaults.get(setting_field.name, setting_field.default)
        help_text = meta["help"]
        if setting_field.name == "max_time" and default_max_time:
            help_text += f" (default: {default_max_time:g} unless --max-steps is given)"
        if setting_field.type in (bool, bool | None):  # --compile and --no-compile: a script's default True holds
            group.add_argument(f"--{flag_name(setting_field)}", action=argparse.BooleanOptionalAction,
                               default=default, help=help_text)
            continue
        group.add_argument(f"--{flag_name(setting_field)}", type=value_type(setting_field), default=default,
                           choices=meta["choices"], metavar=meta["metavar"], help=help_text)
    return group


def flag_name(setting_field):
    return setting_field.name.replace("_", "-")


def value_type(setting_field):
    """int for `int` and `int | None`: what argparse converts the flag's text with."""
    if isinstance(setting_field.type, types.UnionType):
        return next(kind for kind in setting_field.type.__args__ if kind is not type(None))
    return setting_field.type


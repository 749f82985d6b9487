"""The settings of a training run: the flags every training script shares, as one typed object.

Each script adds the flags with its own defaults (add_training_args), then builds TrainingSettings from
what was parsed; the checks happen there, once, so a number out of range ends in one line naming the
flag (`--lr must be > 0, not -1.0`), never in a traceback from deep inside the optimizer.
"""
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import UserError, check_flag

DTYPES = ("auto", "float32", "bfloat16", "float16")
LR_SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class TrainingSettings:
    out: Path
    epochs: int = 1
    max_steps: int | None = None
    max_time: float | None = None
    batch_size: int = 8
    micro_batch_size: int | None = None
    lr: float = 3e-4
    weight_decay: float = 0.1
    warmup_steps: int | None = None
    lr_schedule: str = "cosine"
    grad_clip: float = 1.0
    eval_interval: int | None = None
    eval_batches: int = 10
    dtype: str = "auto"
    compile: bool = False
    seed: int = 123
    device: str | None = None
    resume: bool = False

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        at_least_one = ("epochs", "max_steps", "batch_size", "micro_batch_size", "eval_interval", "eval_batches")
        for name in at_least_one:
            check_flag(name, getattr(self, name), lambda value: value >= 1, ">= 1")
        check_flag("lr", self.lr, lambda value: value > 0, "> 0")
        check_flag("max_time", self.max_time, lambda value: value > 0, "> 0 seconds")
        for name in ("weight_decay", "warmup_steps", "grad_clip"):
            check_flag(name, getattr(self, name), lambda value: value >= 0, ">= 0 (0 turns it off)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, not {self.lr_schedule!r}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")

    @classmethod
    def from_args(cls, args):
        """The settings among an argparse Namespace's attributes (add_training_args's flags). A script's
        default --max-time applies when neither --max-time nor --max-steps is given: a number of steps
        asks for the same run on every machine."""
        values = {field.name: getattr(args, field.name) for field in fields(cls)}
        if values["max_time"] is None and values["max_steps"] is None:
            values["max_time"] = args.default_max_time
        return cls(**values)

    def as_dict(self):
        """For the checkpoint: plain JSON-able values."""
        return {**asdict(self), "out": str(self.out)}


def add_training_args(parser, *, epochs=1, max_time=None, batch_size=8, lr=3e-4, eval_interval=None, eval_batches=10,
                      weight_decay=0.1, out="checkpoints/model.pt"):
    """The flags every training script shares; each script picks its own defaults."""
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=epochs, help="passes over the training set (default: %(default)s)")
    group.add_argument("--max-steps", type=int, default=None, help="optimizer steps to run; wins over --epochs")
    group.add_argument("--max-time", type=float, default=None, metavar="SECONDS",
                       help="train for this long (start-up excluded), at most --max-steps or --epochs: the steps "
                            "that fit are planned before the first one, for the learning-rate schedule"
                            + (f" (default: {max_time:g} unless --max-steps is given)" if max_time else ""))
    parser.set_defaults(default_max_time=max_time)  # applied by TrainingSettings.from_args
    group.add_argument("--batch-size", type=int, default=batch_size,
                       help="samples per optimizer step, summed over all processes (default: %(default)s)")
    group.add_argument("--micro-batch-size", type=int, default=None,
                       help="samples per forward pass and process; smaller values trade speed for memory "
                            "through gradient accumulation (default: the whole share of a process)")
    group.add_argument("--lr", type=float, default=lr, help="peak learning rate (default: %(default)s)")
    group.add_argument("--weight-decay", type=float, default=weight_decay,
                       help="AdamW weight decay on matrices (default: %(default)s)")
    group.add_argument("--warmup-steps", type=int, default=None,
                       help="linear warmup before the cosine decay (default: 5%% of the steps)")
    group.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine",
                       help="after the warmup: cosine decay to a tenth of --lr at the last step, or constant "
                            "(default: %(default)s)")
    group.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 to disable (default: %(default)s)")
    group.add_argument("--eval-interval", type=int, default=eval_interval,
                       help="evaluate (and save) every N steps (default: once per epoch, and at the end)")
    group.add_argument("--eval-batches", type=int, default=eval_batches,
                       help="batches of the training and validation sets per evaluation (default: %(default)s)")
    group.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="precision of the matrix products (autocast): auto is bfloat16 where the GPU or CPU "
                            "computes it natively (AMX, AVX512-BF16), else float32 (default: %(default)s)")
    group.add_argument("--compile", action="store_true", help="torch.compile the model (faster steps, slow start)")
    group.add_argument("--seed", type=int, default=123, help="random seed (default: %(default)s)")
    group.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    group.add_argument("--out", type=Path, default=Path(out), help="checkpoint to write (default: %(default)s)")
    group.add_argument("--resume", action="store_true", help="continue from the last checkpoint beside --out")
    return group

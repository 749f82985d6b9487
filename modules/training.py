"""The one training loop, used by train.py, fine_tune_classifier.py and fine_tune_instructional.py.

A script describes its task (data, loss, what to evaluate, what to store in the checkpoint) with a
TrainingTask and hands it to `train()`, which does the rest: AdamW, warmup + cosine learning rate,
gradient accumulation and clipping, mixed precision, DDP under torchrun, periodic evaluation,
checkpoints (the best by validation loss, and the last one with everything needed to resume),
Ctrl-C handling, a loss plot and a metrics file.

Batches are the same whatever the number of processes: `--batch-size` is the global batch of one
optimizer step. Each step draws its samples from a seeded permutation of the training set, each process
takes its share of them and accumulates gradients over micro-batches until the global batch is done.
"""
import json
import math
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.utils.data import default_collate
from tqdm import tqdm

from .checkpoint import read_checkpoint, save_checkpoint
from .device import get_device
from .errors import UserError
from .files import atomic_write_text, exclusive_output
from .lora import lora_state_dict
from .optim import make_optimizer
from .speed import keep_freed_memory


# ----------------------------------------------------------------------------- command line
def add_training_args(parser, *, epochs=1, batch_size=8, lr=3e-4, eval_interval=None, eval_batches=10,
                      weight_decay=0.1, warmup_steps=None, out="checkpoints/model.pt"):
    """The flags every training script shares; each script picks its own defaults."""
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=epochs, help="passes over the training set (default: %(default)s)")
    group.add_argument("--max-steps", type=int, default=None, help="optimizer steps to run; wins over --epochs")
    group.add_argument("--batch-size", type=int, default=batch_size,
                       help="samples per optimizer step, summed over all processes (default: %(default)s)")
    group.add_argument("--micro-batch-size", type=int, default=None,
                       help="samples per forward pass and process; smaller values trade speed for memory "
                            "through gradient accumulation (default: the whole share of a process)")
    group.add_argument("--lr", type=float, default=lr, help="peak learning rate (default: %(default)s)")
    group.add_argument("--weight-decay", type=float, default=weight_decay, help="AdamW weight decay on matrices (default: %(default)s)")
    group.add_argument("--warmup-steps", type=int, default=warmup_steps,
                       help="linear warmup before the cosine decay (default: 5%% of the steps)")
    group.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 to disable (default: %(default)s)")
    group.add_argument("--eval-interval", type=int, default=eval_interval,
                       help="evaluate (and save) every N steps (default: once per epoch, and at the end)")
    group.add_argument("--eval-batches", type=int, default=eval_batches,
                       help="batches of the training and validation sets per evaluation (default: %(default)s)")
    group.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                       help="autocast precision (default: bfloat16 on GPUs that support it, else float32)")
    group.add_argument("--compile", action="store_true", help="torch.compile the model (faster steps, slow start)")
    group.add_argument("--seed", type=int, default=123, help="random seed (default: %(default)s)")
    group.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    group.add_argument("--out", type=Path, default=Path(out), help="checkpoint to write (default: %(default)s)")
    group.add_argument("--resume", action="store_true", help="continue from the last checkpoint beside --out")
    return group


def add_init_args(parser, *, init, config="tiny"):
    """--init, --config and --models-dir: where a training script's starting weights come from."""
    group = parser.add_argument_group("model")
    group.add_argument("--init", default=init,
                       help="starting weights: 'scratch' (with --config), a GPT-2 size (124M, 355M, 774M, 1558M) "
                            "or a checkpoint path (default: %(default)s)")
    group.add_argument("--config", default=config, help="GPT_CONFIGS name or JSON file for --init scratch (default: %(default)s)")
    group.add_argument("--models-dir", default="gpt2", help="where OpenAI's weights are kept (default: %(default)s)")
    return group


def last_checkpoint_path(out):
    """checkpoints/model.pt -> checkpoints/model.last.pt, the checkpoint that resumes training."""
    return Path(out).with_suffix(".last.pt")


def metrics_path(out):
    return Path(out).with_suffix(".metrics.json")


def plot_path(out):
    return Path(out).with_suffix(".loss.png")


# ----------------------------------------------------------------------------- processes
@dataclass
class Distributed:
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

    def all_reduce_sum(self, tensor):
        if self.world_size > 1:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor


def setup_distributed(device_name=None):
    """Join the process group when started by torchrun (NCCL on GPUs, gloo on CPU), else run alone."""
    if "RANK" not in os.environ:
        return Distributed(0, 1, get_device(device_name))
    device = get_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(torch_dist.get_rank(), torch_dist.get_world_size(), device)


def cleanup_distributed():
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


# ----------------------------------------------------------------------------- tasks
class TrainingTask:
    """What a script trains: override what differs. The defaults are next-token prediction."""

    kind = "lm"
    metric_names = ("loss",)  # what metrics() returns; every process must know them, even one with no batch

    def __init__(self, train_set, val_set):
        self.train_set = train_set
        self.val_set = val_set

    def collate(self, samples):
        input_ids, targets = default_collate(samples)
        return {"input_ids": input_ids, "targets": targets}

    def loss(self, model, batch):
        """Mean loss of a batch (what is minimised)."""
        logits = model(batch["input_ids"])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=-100)

    def metrics(self, model, batch):
        """{name: (sum, count)} of a batch for evaluation; averaged over all evaluated batches."""
        size = len(batch["input_ids"])
        return {"loss": (self.loss(model, batch).item() * size, size)}

    def num_tokens(self, batch):
        return batch["input_ids"].numel()

    def sample(self, model):
        """Text to print at each evaluation, to watch the model learn (None for nothing)."""
        return None

    def checkpoint_metadata(self):
        """Entries stored in every checkpoint besides the weights (label names, data settings...)."""
        return {}


# ----------------------------------------------------------------------------- the loop
def learning_rate_factor(step, warmup_steps, total_steps, min_factor=0.1):
    """Linear warmup to the peak, then cosine decay to min_factor of it at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def autocast_context(dtype_name, device):
    """Mixed precision for the forward pass; float32 means none."""
    if dtype_name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype_name = "bfloat16" if cuda_bf16 else "float32"
    if dtype_name == "float32":
        return nullcontext(), None
    dtype = getattr(torch, dtype_name)
    scaler = torch.amp.GradScaler("cuda") if dtype is torch.float16 and device.type == "cuda" else None
    return torch.autocast(device.type, dtype=dtype), scaler


class _StopRequest:
    """The first Ctrl-C asks to stop after the current step, so the step completes and the last
    checkpoint is consistent; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def _to_device(batch, device):
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value for key, value in batch.items()}


def _json_safe(namespace):
    return {key: value if isinstance(value, (int, float, bool, type(None))) else str(value)
            for key, value in vars(namespace).items()}


class Trainer:
    """State of one training run; `train()` below is the entry point."""

    def __init__(self, model, task, args, dist):
        self.task, self.args, self.dist = task, args, dist
        self.global_batch = args.batch_size
        self.steps_per_epoch, self.micro_batch, self.accumulation = self._plan_batches()
        self.total_steps = args.max_steps or args.epochs * self.steps_per_epoch
        if self.total_steps < 1:
            raise UserError("nothing to train: --epochs and --max-steps must be at least 1")
        self.warmup_steps = args.warmup_steps if args.warmup_steps is not None else max(1, self.total_steps // 20)
        self.eval_interval = args.eval_interval or self.steps_per_epoch

        self.model = model.to(dist.device)
        if dist.device.type == "cpu":
            keep_freed_memory()  # a fifth faster on CPU: each step reuses the last one's pages
        self.optimizer = make_optimizer(self.model, args.lr, args.weight_decay, dist.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: learning_rate_factor(step, self.warmup_steps, self.total_steps))
        self.autocast, self.scaler = autocast_context(args.dtype, dist.device)
        self.step = 0
        self.tokens_seen = 0
        self.best_val_loss = float("inf")
        self.step_losses = []  # (step, tokens seen, training loss) of every step
        self.evaluations = []  # one dict per evaluation
        if args.resume:
            self._resume()
        self.training_model = self.model
        if args.compile:
            self.training_model = torch.compile(self.training_model)
        if dist.world_size > 1:
            device_ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.training_model = torch.nn.parallel.DistributedDataParallel(self.training_model, device_ids=device_ids)

    def _plan_batches(self):
        world, batch = self.dist.world_size, self.global_batch
        if batch < 1 or batch % world:
            raise UserError(f"--batch-size {batch} must be a positive multiple of the number of processes ({world})")
        micro = self.args.micro_batch_size or batch // world
        if (batch // world) % micro:
            raise UserError(f"--micro-batch-size {micro} must divide the {batch // world} samples of each process's share")
        steps_per_epoch = len(self.task.train_set) // batch
        if steps_per_epoch == 0:
            raise UserError(
                f"the training set has {len(self.task.train_set)} samples, fewer than one batch of {batch}: "
                "lower --batch-size or add data"
            )
        return steps_per_epoch, micro, batch // (world * micro)

    # ---------------------------------------------------------------- data
    def _step_indices(self, step):
        """This process's sample indices for optimizer step `step`."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if getattr(self, "_epoch", None) != epoch:
            generator = torch.Generator().manual_seed(self.args.seed + epoch)
            self._permutation, self._epoch = torch.randperm(len(self.task.train_set), generator=generator), epoch
        indices = self._permutation[position * self.global_batch:(position + 1) * self.global_batch]
        return indices[self.dist.rank::self.dist.world_size].tolist()

    def _batch(self, dataset, indices):
        return _to_device(self.task.collate([dataset[i] for i in indices]), self.dist.device)

    # ---------------------------------------------------------------- one step
    def _train_step(self):
        indices = self._step_indices(self.step)
        total_loss = torch.zeros((), device=self.dist.device)
        tokens = 0
        for micro_step in range(self.accumulation):
            batch = self._batch(self.task.train_set, indices[micro_step * self.micro_batch:(micro_step + 1) * self.micro_batch])
            last = micro_step == self.accumulation - 1
            # DDP averages gradients across processes after every backward; between micro-batches of
            # one step that communication is wasted, so only the last backward synchronises.
            sync = nullcontext() if last or self.dist.world_size == 1 else self.training_model.no_sync()
            with sync:
                with self.autocast:
                    loss = self.task.loss(self.training_model, batch) / self.accumulation
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total_loss += loss.detach()
            tokens += self.task.num_tokens(batch)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.args.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        loss_value = self.dist.all_reduce_sum(total_loss).item() / self.dist.world_size
        self.step += 1
        self.tokens_seen += tokens * self.dist.world_size
        self.step_losses.append((self.step, self.tokens_seen, loss_value))
        return loss_value, tokens * self.dist.world_size

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate_dataset(self, dataset, max_batches=None):
        """{metric: mean} over the first `max_batches` micro-batches of `dataset`, shared out over processes."""
        model = self.model
        was_training = model.training
        model.eval()
        batches = math.ceil(len(dataset) / self.micro_batch)
        if max_batches:
            batches = min(batches, max_batches)
        sums = {}
        for batch_index in range(self.dist.rank, batches, self.dist.world_size):
            start = batch_index * self.micro_batch
            batch = self._batch(dataset, range(start, min(start + self.micro_batch, len(dataset))))
            with self.autocast:
                for name, (total, count) in self.task.metrics(model, batch).items():
                    previous = sums.get(name, (0.0, 0))
                    sums[name] = (previous[0] + total, previous[1] + count)
        names = self.task.metric_names
        packed = torch.tensor([[*sums.get(name, (0.0, 0))] for name in names], dtype=torch.float64, device=self.dist.device)
        packed = self.dist.all_reduce_sum(packed)
        model.train(was_training)
        return {name: (total / count if count else float("nan")) for name, (total, count) in zip(names, packed.tolist())}

    def _evaluate(self):
        train_metrics = self.evaluate_dataset(self.task.train_set, self.args.eval_batches)
        val_metrics = self.evaluate_dataset(self.task.val_set, self.args.eval_batches)
        record = {"step": self.step, "tokens_seen": self.tokens_seen,
                  **{f"train_{name}": value for name, value in train_metrics.items()},
                  **{f"val_{name}": value for name, value in val_metrics.items()}}
        self.evaluations.append(record)
        if self.dist.is_main:
            shown = " | ".join(f"{key} {value:.4f}" for key, value in record.items() if key.startswith(("train_", "val_")))
            tqdm.write(f"step {self.step}/{self.total_steps} | {shown}")
            self.model.eval()
            sample = self.task.sample(self.model)
            self.model.train()
            if sample:
                tqdm.write(f"sample: {sample!r}")
        if record["val_loss"] < self.best_val_loss:
            self.best_val_loss = record["val_loss"]
            if self.dist.is_main:
                self._save(self.args.out, with_train_state=False)
        if self.dist.is_main:
            self._save(last_checkpoint_path(self.args.out), with_train_state=True)
            self.write_reports()

    # ---------------------------------------------------------------- checkpoints and reports
    def _save(self, path, with_train_state):
        extra = {**self.task.checkpoint_metadata(), "step": self.step, "tokens_seen": self.tokens_seen,
                 "val_loss": self.evaluations[-1]["val_loss"] if self.evaluations else None,
                 "training_args": _json_safe(self.args)}
        if with_train_state:
            extra["train_state"] = {
                "optimizer_state_dict": self.optimizer.state_dict(),
                "scheduler_state_dict": self.scheduler.state_dict(),
                "scaler_state_dict": self.scaler.state_dict() if self.scaler else None,
                # Taken between steps: the state the next step starts from.
                "rng_state": torch.get_rng_state(),
                "cuda_rng_state": torch.cuda.get_rng_state(self.dist.device) if self.dist.device.type == "cuda" else None,
                "best_val_loss": self.best_val_loss,
                "step_losses": self.step_losses,
                "evaluations": self.evaluations,
                "global_batch": self.global_batch,
                "train_samples": len(self.task.train_set),
                # Checkpoints hold LoRA adapters merged into the weights; resuming needs them apart.
                "lora_state_dict": lora_state_dict(self.model),
            }
        save_checkpoint(path, self.model, self.task.kind, **extra)

    def _resume(self):
        path = last_checkpoint_path(self.args.out)
        if not path.is_file():
            raise UserError(f"nothing to resume: {path} does not exist (it is written at each evaluation); drop --resume to start afresh")
        checkpoint = read_checkpoint(path, kinds=(self.task.kind,))
        state = checkpoint.get("train_state")
        if state is None:
            raise UserError(f"{path} holds no training state to resume from")
        if (state["global_batch"], state["train_samples"]) != (self.global_batch, len(self.task.train_set)):
            raise UserError(
                f"{path} was trained with --batch-size {state['global_batch']} on {state['train_samples']} samples; "
                f"resume with the same data and batch size (now {self.global_batch} and {len(self.task.train_set)})"
            )
        try:
            self.model.load_state_dict(state.get("lora_state_dict") or checkpoint["model_state_dict"])
        except RuntimeError:
            raise UserError(f"{path} holds a different model than the one configured now; resume with the same --init/--config") from None
        self.optimizer.load_state_dict(state["optimizer_state_dict"])
        self.scheduler.load_state_dict(state["scheduler_state_dict"])
        if self.scaler and state["scaler_state_dict"]:
            self.scaler.load_state_dict(state["scaler_state_dict"])
        torch.set_rng_state(state["rng_state"])
        if state["cuda_rng_state"] is not None and self.dist.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng_state"], self.dist.device)
        self.step, self.tokens_seen = checkpoint["step"], checkpoint["tokens_seen"]
        self.best_val_loss = state["best_val_loss"]
        self.step_losses = [tuple(entry) for entry in state["step_losses"]]
        self.evaluations = list(state["evaluations"])
        if self.step >= self.total_steps:
            raise UserError(f"{path} has already trained {self.step} steps; raise --max-steps or --epochs to continue")
        if self.dist.is_main:
            tqdm.write(f"resuming from {path} at step {self.step}")

    def final_metrics(self):
        last = self.evaluations[-1] if self.evaluations else {}
        return {**{key: value for key, value in last.items() if key.startswith(("train_", "val_"))},
                "best_val_loss": self.best_val_loss, "steps": self.step, "tokens_seen": self.tokens_seen,
                "evaluations": self.evaluations}

    def write_reports(self, extra_metrics=None):
        """The metrics file and the loss plot beside the checkpoint (main process only)."""
        metrics = {**self.final_metrics(), **(extra_metrics or {})}
        write_metrics(self.args.out, metrics)
        plot_training(plot_path(self.args.out), self.step_losses, self.evaluations)
        return metrics

    # ---------------------------------------------------------------- run
    def run(self):
        self.training_model.train()
        progress = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                        disable=not self.dist.is_main, dynamic_ncols=True)
        with _StopRequest() as stop:
            while self.step < self.total_steps:
                started = time.perf_counter()
                loss, tokens = self._train_step()
                progress.update()
                progress.set_postfix(loss=f"{loss:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                                     tokens_per_s=f"{tokens / (time.perf_counter() - started):,.0f}")
                if self.step % self.eval_interval == 0 or self.step == self.total_steps:
                    self._evaluate()
                if self._stop_requested(stop):
                    if self.dist.is_main:
                        self._save(last_checkpoint_path(self.args.out), with_train_state=True)
                        self.write_reports()
                        progress.close()
                        tqdm.write(f"interrupted after step {self.step}: saved {last_checkpoint_path(self.args.out)}; "
                                   "run the same command with --resume to continue")
                    raise KeyboardInterrupt
        progress.close()
        return self.final_metrics()

    def _stop_requested(self, stop):
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.dist.device)
        return self.dist.all_reduce_sum(flag).item() > 0


def train(model, task, args, dist):
    """Train `model` on `task` as `args` say; returns the Trainer (final metrics, evaluate_dataset...)."""
    trainer = Trainer(model, task, args, dist)
    with exclusive_output(args.out) if dist.is_main else nullcontext():
        trainer.run()
    return trainer


# ----------------------------------------------------------------------------- reports
def write_metrics(out, metrics):
    """`<checkpoint>.metrics.json`, written atomically."""
    atomic_write_text(metrics_path(out), json.dumps(metrics, indent=2))


def plot_training(path, step_losses, evaluations):
    """Training and validation loss against tokens seen, plus any other evaluated metric (accuracy)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = sorted({key[4:] for record in evaluations for key in record if key.startswith("val_")} - {"loss"})
    figure, axes = plt.subplots(1, 1 + len(extra), figsize=(6 * (1 + len(extra)), 4), squeeze=False)
    loss_axis = axes[0][0]
    if step_losses:
        _, tokens, losses = zip(*step_losses)
        loss_axis.plot(tokens, losses, alpha=0.4, label="training loss (each step)")
    for split in ("train", "val"):
        points = [(record["tokens_seen"], record[f"{split}_loss"]) for record in evaluations]
        if points:
            loss_axis.plot(*zip(*points), marker="o", label=f"{'training' if split == 'train' else 'validation'} loss (evaluation)")
    loss_axis.set(xlabel="tokens seen", ylabel="loss", title="loss")
    loss_axis.legend()
    for axis, name in zip(axes[0][1:], extra):
        for split in ("train", "val"):
            axis.plot([r["step"] for r in evaluations], [r[f"{split}_{name}"] for r in evaluations], marker="o", label=split)
        axis.set(xlabel="step", ylabel=name, title=name)
        axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)

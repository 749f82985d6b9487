"""The one training loop, used by train.py, fine_tune_classifier.py and fine_tune_instructional.py.

A run, in the order of this file:

1. Before the first step, the memory plan (memory_plan.py: a run that will not fit stops there) and the
   choices that shape the run, each printed on one line with its reason (Trainer.make_choices): the precision, the loss function (compiled where that pays back within the
   run), and with --max-time the number of steps that fit.
2. Each optimizer step (Trainer.train_step, read top to bottom): the learning rate of this step; this
   process's micro-batches of the step's samples; for each, the forward pass under autocast, the loss
   and the backward pass (under DDP, gradients are averaged across processes on the last micro-batch
   only; under FSDP, sharding.py, reduce-scattered there); gradient clipping; the optimizer step.
3. Every `eval_interval` steps and after the last: evaluation on training and validation batches, the
   best model and the last state (for --resume) saved, the metrics file and the loss plot written.

A script says what it trains with a TrainingTask (task.py: data, loss, metrics, sample, checkpoint
entries). Which samples and which learning rate each step gets follows from the step number alone
(plan.py), so a resumed run repeats the steps of an uninterrupted one.
"""
import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from ..errors import UserError
from ..files import exclusive_output
from ..lora import merge_lora
from ..speed.compilation import compiled_model, fastest_loss
from ..speed.memory import keep_freed_memory
from ..speed.precision import describe_precision, mixed_precision, resolve_dtype
from .activation_checkpointing import checkpoint_activations
from .interrupt import StopRequest
from .memory_plan import RunShape, check_fits, memory_per_process
from .optimizer import make_optimizer
from .plan import BatchPlan, default_warmup_steps, learning_rate_factor, steps_that_fit
from .reports import last_checkpoint_path, plot_path, plot_training, write_metrics
from .resume import random_state, restore_random_state, restore_train_state, train_state
from .sharded_state import restore_sharded_train_state, save_sharded_state, sharded_state_path, sharded_train_state
from .sharding import gathered_model, root_gathered, shard_model, shardable_dtype

REHEARSAL_STEPS = 3  # --max-time: step 0's gradients computed this often to time a step; the first warms up


def train(model, task, settings, process):
    """Train `model` on `task` as `settings` (a TrainingSettings) say; returns the Trainer, whose
    evaluate(), load_best() and write_reports() serve the script's final evaluation."""
    trainer = Trainer(model, task, settings, process)
    with exclusive_output(settings.out) if process.is_main else nullcontext():
        trainer.run()
    return trainer


@dataclass
class Progress:
    """How far a run has got, and what it measured on the way: the loop's state besides the weights and
    the optimizer's, saved in the last checkpoint for --resume."""

    step: int = 0
    planned_steps: int | None = None  # with --max-time: the steps that fit, fixed before the first step
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    step_losses: list = field(default_factory=list)  # (step, tokens seen, training loss) of every step
    evaluations: list = field(default_factory=list)  # one dict per evaluation
    last_sample: str | None = None  # the task's sample text at the last evaluation


class Trainer:
    """One training run: its model, optimizer, precision and batches, and how far it has got."""

    def __init__(self, model, task, settings, process):
        self.task, self.settings, self.process = task, settings, process
        self.batches = BatchPlan(len(task.train_set), settings.batch_size, settings.micro_batch_size, process.rank,
                                 process.world_size, settings.seed)
        # The steps the flags allow; with --max-time, make_choices plans the steps that fit in the time.
        self.step_limit = settings.max_steps or settings.epochs * self.batches.steps_per_epoch
        self.eval_interval = settings.eval_interval or self.batches.steps_per_epoch

        # --parallel fsdp: the model sharded across the processes, and the resume state written sharded
        # (by one process too, so that any number of processes can resume it).
        self.sharded = settings.parallel == "fsdp" and process.world_size > 1
        if settings.parallel == "fsdp":
            shardable_dtype(settings.dtype, process.device)
        self.check_memory(model)  # before the model takes any of the device's memory
        self.model = model.to(process.device)
        if settings.activation_checkpointing:
            checkpoint_activations(self.model)
        if self.sharded:
            shard_model(self.model, settings.dtype, process.device)
        if process.device.type == "cpu":
            keep_freed_memory()  # a fifth faster on CPU: each step reuses the last one's pages
        self.optimizer = make_optimizer(self.model, settings.lr, settings.weight_decay, process.device)
        self.autocast, self.scaler = mixed_precision(settings.dtype, process.device)
        self.data_signature = {"global_batch": settings.batch_size, "train_samples": len(task.train_set)}
        self.progress = Progress()
        if settings.resume:
            self.progress = self.resumed_progress()
        self.training_model = self.model_for_training()

    def model_for_training(self):
        """The model the steps run: compiled with --compile, wrapped in DDP across processes, which
        averages the gradients during the backward pass (FSDP's model is the sharded self.model). The
        weights stay those of self.model."""
        model = compiled_model(self.model) if self.settings.compile else self.model
        if self.process.world_size > 1 and not self.sharded:
            device_ids = [self.process.device.index] if self.process.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return model

    @property
    def total_steps(self):
        return self.progress.planned_steps or self.step_limit

    @property
    def warmup_steps(self):
        given = self.settings.warmup_steps
        return given if given is not None else default_warmup_steps(self.total_steps)

    # ---------------------------------------------------------------- 1. before the first step
    def check_memory(self, model):
        """The memory each process will need (memory_plan.py), printed; a run that will not fit stops
        here, with the flag that would make it fit."""
        strategy = "fsdp" if self.sharded else "ddp" if self.process.world_size > 1 else "one process"
        shape = RunShape(strategy, self.process.world_size, self.batches.micro_batch, self.task.longest_batch_tokens(),
                         resolve_dtype(self.settings.dtype, self.process.device).itemsize,
                         self.settings.activation_checkpointing, self.process.device.type)
        available = memory_per_process(self.process.device)
        self.say(check_fits(model, shape, available, can_lora=self.task.kind != "lm").describe())

    def make_choices(self):
        """The choices made before training, each one printed line saying what was chosen and why."""
        self.say(describe_precision(self.settings.dtype, self.process.device))
        planning = self.settings.max_time and self.progress.planned_steps is None
        if planning:
            step_seconds, evaluation_seconds = self.measured_pace()
            steps = steps_that_fit(self.settings.max_time, step_seconds, evaluation_seconds, self.eval_interval,
                                   self.step_limit)
        seconds_saved = self.choose_loss_function(calls=(steps if planning else self.total_steps) * self.batches.accumulation)
        if planning:  # the plan again, at the pace of the loss chosen
            step_seconds -= seconds_saved * self.batches.accumulation
            self.progress.planned_steps = steps_that_fit(self.settings.max_time, step_seconds, evaluation_seconds,
                                                         self.eval_interval, self.step_limit)
            self.say(f"steps: {self.progress.planned_steps:,} fit in --max-time {self.settings.max_time:g} s, at "
                     f"{step_seconds:.3f} s a step and {evaluation_seconds:.1f} s an evaluation")

    def choose_loss_function(self, calls):
        """The task's loss function or its compiled form, whichever pays for `calls` calls here on the logits
        of one micro-batch (modules/speed/compilation.py); returns the seconds it saves a call. The model
        runs in eval mode, without gradients: no dropout, so the random generators do not move."""
        batch = self.batch(self.task.train_set, self.batches.micro_batches(0)[0])
        self.model.eval()
        with torch.no_grad(), self.autocast:
            logits, targets = self.task.logits_and_targets(self.model, batch)
        self.model.train()
        choice = fastest_loss(self.task.loss_function, logits, targets, calls)
        self.task.loss_function = choice.function
        self.say(choice.reason)
        return max(0.0, self.process.all_reduce_max(torch.tensor(choice.seconds_saved, dtype=torch.float64,
                                                                 device=self.process.device)).item())

    def measured_pace(self):
        """(seconds per step, seconds per evaluation) here, for --max-time, at the pace of the slowest
        process. A step: its gradients computed REHEARSAL_STEPS times without an update (weights, optimizer
        and random generators are left as they were; the first warms up). An evaluation: its forward
        passes, a third of a step's micro-batch each (the backward pass costs twice the forward), and the
        sample, timed once."""
        random_generators = random_state(self.process.device)
        timings = []
        for _ in range(REHEARSAL_STEPS):
            started = time.perf_counter()
            self.accumulate_gradients(0)
            self.optimizer.zero_grad(set_to_none=True)
            if self.process.device.type == "cuda":
                torch.cuda.synchronize(self.process.device)
            timings.append(time.perf_counter() - started)
        step_seconds = statistics.mean(timings[1:])
        started = time.perf_counter()
        self.sample()
        sample_seconds = time.perf_counter() - started
        restore_random_state(random_generators, self.process.device)
        forward_passes = sum(math.ceil(self.evaluation_batches(dataset, self.settings.eval_batches)[1] / self.process.world_size)
                             for dataset in (self.task.train_set, self.task.val_set))
        evaluation_seconds = forward_passes * step_seconds / self.batches.accumulation / 3 + sample_seconds
        measured = torch.tensor([step_seconds, evaluation_seconds], dtype=torch.float64, device=self.process.device)
        return tuple(self.process.all_reduce_max(measured).tolist())

    # ---------------------------------------------------------------- 2. one step
    def train_step(self):
        """One optimizer step over the global batch; returns (mean loss, tokens trained on by all processes)."""
        step = self.progress.step
        # The learning rate of this step: warmup, then the schedule's decay (plan.py).
        lr = self.settings.lr * learning_rate_factor(step, self.warmup_steps, self.total_steps, self.settings.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Forward and backward passes over this process's samples of the step.
        loss, tokens = self.accumulate_gradients(step)
        # Clipping: the gradient norm at most grad_clip. A float16 GradScaler's gradients are scaled up;
        # unscaled first, so that the norm is the true one.
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.settings.grad_clip > 0:
            self.clip_gradients(self.settings.grad_clip)
        # The update; the scaler skips it when a gradient overflowed, and adjusts its scale.
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The step's loss, the mean over all processes; the tokens, summed.
        loss_value = self.process.all_reduce_sum(loss).item() / self.process.world_size
        tokens *= self.process.world_size
        self.progress.step += 1
        self.progress.tokens_seen += tokens
        self.progress.step_losses.append((self.progress.step, self.progress.tokens_seen, loss_value))
        return loss_value, tokens

    def accumulate_gradients(self, step):
        """The gradients of this process's share of step `step`'s samples, added up micro-batch by
        micro-batch; returns (the share's mean loss, a tensor, and its tokens)."""
        micro_batches = self.batches.micro_batches(step)
        total_loss = torch.zeros((), device=self.process.device)
        tokens = 0
        for index, indices in enumerate(micro_batches):
            batch = self.batch(self.task.train_set, indices)
            with self.gradient_sync(last=index == len(micro_batches) - 1):
                with self.autocast:
                    # Each micro-batch's mean loss counts for its share, so the gradients add up to the
                    # gradient of the whole share's mean.
                    loss = self.task.loss(self.training_model, batch) / len(micro_batches)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total_loss += loss.detach()
            tokens += self.task.num_tokens(batch)
        return total_loss, tokens

    def gradient_sync(self, last):
        """DDP averages the gradients across processes after every backward pass; between the
        micro-batches of one step that communication is wasted, so only the last one synchronises.
        FSDP likewise reduce-scatters the gradients of the last micro-batch only."""
        if self.sharded:
            self.model.set_requires_gradient_sync(last)
            return nullcontext()
        return nullcontext() if last or self.process.world_size == 1 else self.training_model.no_sync()

    def clip_gradients(self, max_norm):
        """Scale the gradients down so that their norm over all trained parameters is at most max_norm."""
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], max_norm)

    def batch(self, dataset, indices):
        """The samples `indices` of `dataset`, collated by the task and moved to this process's device."""
        batch = self.task.collate([dataset[i] for i in indices])
        return {key: value.to(self.process.device, non_blocking=True) if torch.is_tensor(value) else value
                for key, value in batch.items()}

    # ---------------------------------------------------------------- the run
    def run(self):
        self.make_choices()
        self.training_model.train()
        progress_bar = tqdm(total=self.total_steps, initial=self.progress.step, desc="training", unit="step",
                            disable=not self.process.is_main, dynamic_ncols=True)
        try:
            with StopRequest() as stop:
                while self.progress.step < self.total_steps:
                    started = time.perf_counter()
                    loss, tokens = self.train_step()
                    progress_bar.update()
                    progress_bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                             tokens_per_s=f"{tokens / (time.perf_counter() - started):,.0f}")
                    if self.progress.step % self.eval_interval == 0 or self.progress.step == self.total_steps:
                        self.evaluate_and_save()
                    if self._stop_requested(stop):
                        self._save_and_stop(progress_bar)
        finally:
            # DDP's wrapper holds the process group. Freed after the script has left the group (training_run),
            # gloo's destructor waited for its threads forever: 1 run in 5 of two CPU processes hung at exit.
            self.training_model = self.model
        progress_bar.close()

    def _stop_requested(self, stop):
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.process.device)
        return self.process.all_reduce_sum(flag).item() > 0

    def _save_and_stop(self, progress_bar):
        self.save_resume_state()
        if self.process.is_main:
            self.write_reports()
            progress_bar.close()
            tqdm.write(f"interrupted after step {self.progress.step}: saved {self.resume_path}; "
                       "run the same command with --resume to continue")
        raise KeyboardInterrupt

    def say(self, line):
        """A line for the user, from the main process only."""
        if self.process.is_main:
            tqdm.write(line)

    # ---------------------------------------------------------------- 3. evaluation
    @torch.no_grad()
    def evaluate(self, dataset, max_batches=None):
        """{metric: mean} over the first `max_batches` micro-batches of `dataset` (all if None), shared out
        over the processes."""
        was_training = self.model.training
        self.model.eval()
        batches, rounds = self.evaluation_batches(dataset, max_batches)
        sums = {name: [0.0, 0] for name in self.task.metric_names}
        for batch_index in range(self.process.rank, rounds, self.process.world_size):
            counted = batch_index < batches
            start = (batch_index if counted else 0) * self.batches.micro_batch
            batch = self.batch(dataset, range(start, min(start + self.batches.micro_batch, len(dataset))))
            with self.autocast:
                metrics = self.task.metrics(self.model, batch)
            for name, (total, count) in metrics.items() if counted else ():
                sums[name][0] += total
                sums[name][1] += count
        packed = torch.tensor(list(sums.values()), dtype=torch.float64, device=self.process.device)
        packed = self.process.all_reduce_sum(packed)
        self.model.train(was_training)
        return {name: (total / count if count else math.nan) for name, (total, count) in zip(sums, packed.tolist())}

    def evaluation_batches(self, dataset, max_batches):
        """(micro-batches counted, rounds run over all processes) of evaluating `dataset`. Sharded, every
        forward pass gathers weights from all processes, so all run as many: one whose share is done
        evaluates the first batch again, uncounted."""
        batches = math.ceil(len(dataset) / self.batches.micro_batch)
        if max_batches:
            batches = min(batches, max_batches)
        rounds = math.ceil(batches / self.process.world_size) * self.process.world_size if self.sharded else batches
        return batches, rounds

    def evaluation(self):
        """(record of the metrics on training and validation batches, the task's sample text or None)."""
        train_metrics = self.evaluate(self.task.train_set, self.settings.eval_batches)
        val_metrics = self.evaluate(self.task.val_set, self.settings.eval_batches)
        record = {"step": self.progress.step, "tokens_seen": self.progress.tokens_seen,
                  **{f"train_{name}": value for name, value in train_metrics.items()},
                  **{f"val_{name}": value for name, value in val_metrics.items()}}
        return record, self.sample()

    def sample(self):
        """The task's sample text on the main process, None on the others. Sharded, every process runs its
        forward passes, as each gathers weights from all."""
        if not (self.process.is_main or self.sharded):
            return None
        self.model.eval()
        with root_gathered(self.model) if self.sharded else nullcontext():
            sample = self.task.sample(self.model)
        self.model.train()
        return sample if self.process.is_main else None

    def evaluate_and_save(self):
        record, sample = self.evaluation()
        self.progress.evaluations.append(record)
        improved = record["val_loss"] < self.progress.best_val_loss
        self.progress.best_val_loss = min(self.progress.best_val_loss, record["val_loss"])
        if self.process.is_main:
            shown = " | ".join(f"{key} {value:.4f}" for key, value in record.items() if key.startswith(("train_", "val_")))
            tqdm.write(f"step {self.progress.step}/{self.total_steps} | {shown}")
            if sample:
                self.progress.last_sample = sample
                tqdm.write("sample:\n    " + sample.replace("\n", "\n    "))
        if improved:
            self.save_best()
        self.save_resume_state()
        if self.process.is_main:
            self.write_reports()

    # ---------------------------------------------------------------- checkpoints and reports
    @property
    def resume_path(self):
        """Where the last state is saved for --resume: a sharded folder (--parallel fsdp), else one file."""
        if self.settings.parallel == "fsdp":
            return sharded_state_path(self.settings.out)
        return last_checkpoint_path(self.settings.out)

    def save_best(self):
        """The model as one checkpoint at --out, written by the main process; sharded, each process sends
        its shards to the main process's CPU memory first. Every process calls it."""
        model = gathered_model(self.model) if self.sharded else self.model
        if self.process.is_main:
            save_checkpoint(self.settings.out, model, self.task.kind, **self.checkpoint_entries())

    def save_resume_state(self):
        """Everything --resume needs (resume.py): beside the weights in the last checkpoint, or sharded,
        each process writing its own part (sharded_state.py). Every process calls it."""
        if self.settings.parallel == "fsdp":
            state = sharded_train_state(self.model, self.progress, self.data_signature, self.process.device)
            save_sharded_state(self.resume_path, self.model, self.optimizer, state, self.process)
        elif self.process.is_main:
            state = train_state(self.model, self.optimizer, self.scaler, self.progress, self.data_signature,
                                self.process.device)
            save_checkpoint(self.resume_path, self.model, self.task.kind, **self.checkpoint_entries(), train_state=state)

    def checkpoint_entries(self):
        """What every checkpoint of the run stores besides the weights."""
        return {**self.task.checkpoint_metadata(), "step": self.progress.step, "tokens_seen": self.progress.tokens_seen,
                "val_loss": self.progress.evaluations[-1]["val_loss"] if self.progress.evaluations else None,
                "training_settings": self.settings.as_dict()}

    def resumed_progress(self):
        """--resume: the weights, optimizer, scaler and random generators of the last checkpoint put in
        place (resume.py); returns the run's Progress there."""
        path = self.resume_path
        if self.settings.parallel == "fsdp":
            state = restore_sharded_train_state(path, self.model, self.optimizer, self.data_signature, self.process.device)
        else:
            state = restore_train_state(path, self.task.kind, self.model, self.optimizer, self.scaler,
                                        self.data_signature, self.process.device)
        progress = Progress(**state)
        progress.step_losses = [tuple(entry) for entry in progress.step_losses]
        self.say(f"resuming from {path} at step {progress.step}")
        if progress.step >= (progress.planned_steps or self.step_limit):
            done = (f"the {progress.step} steps its --max-time planned; start a new run to train further"
                    if progress.planned_steps else f"{progress.step} steps; raise --max-steps or --epochs to continue")
            raise UserError(f"{path} has already trained {done}")
        return progress

    def load_best(self):
        """Put the weights of the best checkpoint (lowest validation loss) into the model, for a final
        evaluation; LoRA adapters are merged first, as the checkpoint holds merged weights. Sharded, the
        training is over: every process evaluates the whole best model, unsharded."""
        self.process.wait_for_main_process()  # it may still be writing the best checkpoint
        best = read_checkpoint(self.settings.out, kinds=(self.task.kind,))
        if self.sharded:
            self.model, self.sharded = model_from_checkpoint(best, self.settings.out).to(self.process.device), False
            return
        merge_lora(self.model)
        self.model.load_state_dict(best["model_state_dict"])

    def final_metrics(self):
        last = self.progress.evaluations[-1] if self.progress.evaluations else {}
        return {**{key: value for key, value in last.items() if key.startswith(("train_", "val_"))},
                "best_val_loss": self.progress.best_val_loss, "steps": self.progress.step,
                "tokens_seen": self.progress.tokens_seen, "sample": self.progress.last_sample,
                "evaluations": self.progress.evaluations}

    def write_reports(self, extra_metrics=None):
        """The metrics file and the loss plot beside the checkpoint (main process only); returns the metrics."""
        metrics = {**self.final_metrics(), **(extra_metrics or {})}
        write_metrics(self.settings.out, metrics)
        plot_training(plot_path(self.settings.out), self.progress.step_losses, self.progress.evaluations)
        return metrics

"""The one training loop, used by train.py, fine_tune_classifier.py and fine_tune_instructional.py.

A run, in the order of this file:

1. Before the first step (Trainer.__init__ and prepare): the memory plan (memory_plan.py: a run that will
   not fit stops there), the model on its device as the run's parallelism wants it (parallel.py: one
   process, DDP or FSDP), the optimizer, the precision, the loss compiled or not (--compile-loss), and with
   --max-time the steps that fit, each printed on one line.
2. Each optimizer step (Trainer.train_step, read top to bottom): the learning rate of this step; this
   process's micro-batches of the step's samples; for each, the forward pass under autocast, the loss
   and the backward pass (gradients exchanged between processes on the last micro-batch only); gradient
   clipping; the optimizer step.
3. Every `eval_interval` steps and after the last: evaluation on the same training and validation samples
   whatever the number of processes, the best model and the last state (for --resume) saved, the metrics
   file and the loss plot written. With --max-time the steps that fit are planned again every few steps.

A script says what it trains with a TrainingTask (task.py). Which samples and which learning rate each step
gets follows from the step number (schedule.py), so a resumed run repeats the steps of an uninterrupted one.
"""
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..checkpoint import read_checkpoint, save_checkpoint
from ..errors import UserError
from ..files import exclusive_output
from ..speed.compilation import loss_compilation
from ..speed.memory import keep_freed_memory
from ..speed.precision import describe_precision, mixed_precision, resolve_dtype
from .interrupt import StopRequest
from .memory_plan import RunShape, check_fits, memory_per_process
from .optimizer import make_optimizer
from .parallel import choose_parallelism
from .reports import plot_path, plot_training, write_metrics
from .resume import random_state, restore_random_state
from .schedule import REPLAN_STEPS, BatchPlan, TimeBudget, default_warmup_steps, learning_rate_factor

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
    """How far a run has got and what it measured: the loop's state besides the weights and the
    optimizer's, saved in the last checkpoint for --resume."""

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


class Trainer:
    """One training run: its model, optimizer, precision and batches, and how far it has got."""

    def __init__(self, model, task, settings, process):
        self.task, self.settings, self.process = task, settings, process
        self.parallel = choose_parallelism(settings, process)
        self.batches = BatchPlan(len(task.train_set), settings.batch_size, settings.micro_batch_size, process.rank,
                                 process.world_size, settings.seed)
        self.step_limit = settings.max_steps or settings.epochs * self.batches.steps_per_epoch
        self.eval_interval = settings.eval_interval or self.batches.steps_per_epoch
        self.say(self.memory_plan(model).describe())  # before the model takes any of the device's memory
        self.model, self.training_model = self.parallel.prepare(model)
        if process.device.type == "cpu":
            keep_freed_memory()  # a fifth faster on CPU: each step reuses the last one's pages
        self.optimizer = make_optimizer(self.model, settings.lr, settings.weight_decay, process.device)
        self.autocast, self.scaler = mixed_precision(settings.dtype, process.device)
        self.data_signature = {"global_batch": settings.batch_size, "train_samples": len(task.train_set)}
        self.progress = self.resumed_progress() if settings.resume else Progress()
        self.budget = None

    def memory_plan(self, model):
        """The memory each process will need; a run that will not fit stops here, naming the flag that would."""
        shape = RunShape(self.parallel.memory_strategy, self.process.world_size, self.batches.micro_batch,
                         self.task.longest_batch_tokens(), resolve_dtype(self.settings.dtype, self.process.device).itemsize,
                         self.settings.activation_checkpointing, self.process.device.type)
        return check_fits(model, shape, memory_per_process(self.process.device), can_lora=self.task.kind != "lm")

    def prepare(self):
        """The choices of the run, each on one line: precision, loss, and with --max-time the steps that fit."""
        self.say(describe_precision(self.settings.dtype, self.process.device))
        compile_loss, reason = loss_compilation(self.settings.compile_loss, self.process.device)
        if compile_loss:
            self.task.loss_function = torch.compile(self.task.loss_function)
        self.say(reason)
        if self.settings.max_time:
            first_plan = self.progress.planned_steps is None
            step_seconds, self.progress.evaluation_seconds = (self.rehearsed_pace() if first_plan else
                                                              (None, self.progress.evaluation_seconds))
            self.budget = TimeBudget(self.settings.max_time, self.eval_interval, self.step_limit,
                                     self.progress.seconds_used, self.progress.evaluation_seconds, slowest=self.slowest)
            if first_plan:
                self.progress.planned_steps = self.budget.plan(0, step_seconds)
                self.say(f"steps: {self.progress.planned_steps:,} fit in --max-time {self.settings.max_time:g} s, at "
                         f"{step_seconds:.3f} s a step and {self.budget.evaluation_seconds:.1f} s an evaluation "
                         f"(planned again every {REPLAN_STEPS} steps)")
        if self.progress.warmup_steps is None:
            given = self.settings.warmup_steps
            self.progress.warmup_steps = given if given is not None else default_warmup_steps(self.total_steps)

    def slowest(self, values):
        """The maxima of a list of floats over all processes (so that all plan the same steps)."""
        return self.parallel.max(torch.tensor(values, dtype=torch.float64, device=self.process.device)).tolist()

    @property
    def total_steps(self):
        return self.progress.planned_steps or self.step_limit

    def rehearsed_pace(self):
        """(seconds per step, seconds per evaluation) for the first plan of --max-time. A step: step 0's
        gradients computed REHEARSAL_STEPS times without an update (the first warms up; the random
        generators are put back). An evaluation: its forward passes, a third of a step's micro-batch each
        (the backward pass costs twice the forward), and the sample, timed once."""
        random_generators = random_state(self.process.device)
        timings = []
        for _ in range(REHEARSAL_STEPS):
            started = time.perf_counter()
            self.accumulate_gradients(0)
            self.optimizer.zero_grad(set_to_none=True)
            if self.process.device.type == "cuda":
                torch.cuda.synchronize(self.process.device)
            timings.append(time.perf_counter() - started)
        step_seconds = sum(timings[1:]) / len(timings[1:])
        started = time.perf_counter()
        self.parallel.sample(self.model.eval(), self.task)
        self.model.train()
        sample_seconds = time.perf_counter() - started
        restore_random_state(random_generators, self.process.device)
        forward_passes = sum(len(self.evaluation_chunks(dataset, self.settings.eval_batches)[0])
                             for dataset in (self.task.train_set, self.task.val_set))
        return step_seconds, forward_passes * step_seconds / self.batches.accumulation / 3 + sample_seconds

    # ---------------------------------------------------------------- one step
    def train_step(self):
        """One optimizer step over the global batch; returns (mean loss, tokens trained on by all processes)."""
        step = self.progress.step
        # The learning rate of this step: warmup, then the schedule's decay (schedule.py).
        lr = self.settings.lr * learning_rate_factor(step, self.progress.warmup_steps, self.total_steps,
                                                     self.settings.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Forward and backward passes over this process's samples of the step.
        loss, tokens = self.accumulate_gradients(step)
        # Clipping: the gradient norm at most grad_clip. A float16 GradScaler's gradients are scaled up;
        # unscaled first, so that the norm is the true one.
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                           self.settings.grad_clip)
        # The update; the scaler skips it when a gradient overflowed, and adjusts its scale.
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The step's loss, the mean over all processes; the tokens, summed.
        loss_value = self.parallel.sum(loss).item() / self.process.world_size
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
            # Gradients are exchanged between processes once per step, in the last backward pass.
            with self.parallel.gradient_sync(self.training_model, last=index == len(micro_batches) - 1):
                with self.autocast:
                    # Each micro-batch's mean loss counts for its share, so the gradients add up to the
                    # gradient of the whole share's mean.
                    loss = self.task.loss(self.training_model, batch) / len(micro_batches)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total_loss += loss.detach()
            tokens += self.task.num_tokens(batch)
        return total_loss, tokens

    def batch(self, dataset, indices):
        """The samples `indices` of `dataset`, collated by the task and moved to this process's device."""
        batch = self.task.collate([dataset[i] for i in indices])
        return {key: value.to(self.process.device, non_blocking=True) if torch.is_tensor(value) else value
                for key, value in batch.items()}

    # ---------------------------------------------------------------- the run
    def run(self):
        self.prepare()
        self.training_model.train()
        progress_bar = tqdm(total=self.total_steps, initial=self.progress.step, desc="training", unit="step",
                            disable=not self.process.is_main, dynamic_ncols=True)
        try:
            with StopRequest() as stop:
                while self.progress.step < self.total_steps:
                    started = time.perf_counter()
                    loss, tokens = self.train_step()
                    progress_bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                             tokens_per_s=f"{tokens / (time.perf_counter() - started):,.0f}")
                    if self.budget:
                        self.progress.planned_steps = self.budget.step_done(self.progress.step, self.total_steps)
                        progress_bar.total = self.total_steps
                    progress_bar.update()
                    if self.progress.step % self.eval_interval == 0 or self.progress.step == self.total_steps:
                        self.evaluate_and_save()
                    if self.stop_requested(stop):
                        self.save_and_stop(progress_bar)
        finally:
            # DDP's wrapper holds the process group. Freed after the script has left the group (training_run),
            # gloo's destructor waited for its threads forever: 1 run in 5 of two CPU processes hung at exit.
            self.training_model = self.model
        progress_bar.close()

    def stop_requested(self, stop):
        """Whether Ctrl-C reached any process (interrupt.py): then all stop after this step."""
        return self.parallel.sum(torch.tensor([float(stop.requested)], device=self.process.device)).item() > 0

    def save_and_stop(self, progress_bar):
        """Ctrl-C (interrupt.py): the state after this step saved, and how to resume said."""
        self.parallel.save_resume_state(self)
        if self.process.is_main:
            self.write_reports()
            progress_bar.close()
            tqdm.write(f"interrupted after step {self.progress.step}: saved {self.parallel.resume_path()}; "
                       "run the same command with --resume to continue")
        raise KeyboardInterrupt

    def say(self, line):
        """A line for the user, from the main process only."""
        if self.process.is_main:
            tqdm.write(line)

    # ---------------------------------------------------------------- evaluation and checkpoints
    def evaluation_chunks(self, dataset, max_batches):
        """(this process's (chunk, counted) pairs, chunk size) of evaluating the first `max_batches` batches of
        --batch-size samples of `dataset` (all of it if None): the same samples whatever the number of
        processes, cut into chunks of a micro-batch that the processes share out (parallel.py)."""
        samples = len(dataset) if max_batches is None else min(len(dataset), max_batches * self.settings.batch_size)
        size = self.batches.micro_batch
        return self.parallel.evaluation_chunks(math.ceil(samples / size)), size, samples

    @torch.no_grad()
    def evaluate(self, dataset, max_batches=None):
        """{metric: mean} over the first `max_batches` batches of `dataset` (all of it if None)."""
        was_training = self.model.training
        self.model.eval()
        chunks, size, samples = self.evaluation_chunks(dataset, max_batches)
        sums = {name: [0.0, 0] for name in self.task.metric_names}
        for chunk, counted in chunks:
            with self.autocast:
                metrics = self.task.metrics(self.model, self.batch(dataset, range(chunk * size, min(samples, chunk * size + size))))
            for name, (total, count) in metrics.items() if counted else ():
                sums[name][0] += total
                sums[name][1] += count
        packed = self.parallel.sum(torch.tensor(list(sums.values()), dtype=torch.float64, device=self.process.device))
        self.model.train(was_training)
        return {name: (total / count if count else math.nan) for name, (total, count) in zip(sums, packed.tolist())}

    def evaluate_and_save(self):
        """Evaluation, the sample, the best model and the last state saved, the reports written."""
        started = time.perf_counter()
        record = {"step": self.progress.step, "tokens_seen": self.progress.tokens_seen}
        for split, dataset in (("train", self.task.train_set), ("val", self.task.val_set)):
            metrics = self.evaluate(dataset, self.settings.eval_batches)
            record.update({f"{split}_{name}": value for name, value in metrics.items()})
        self.progress.evaluations.append(record)
        sample = self.parallel.sample(self.model.eval(), self.task)
        self.model.train()
        self.progress.last_sample = sample if self.process.is_main else None
        self.say(f"step {self.progress.step}/{self.total_steps} | " + " | ".join(
            f"{key} {value:.4f}" for key, value in record.items() if key.startswith(("train_", "val_"))))
        if sample:
            self.say("sample:\n    " + sample.replace("\n", "\n    "))
        if record["val_loss"] < self.progress.best_val_loss:
            self.progress.best_val_loss = record["val_loss"]
            best = self.parallel.full_model(self.model)  # every process takes part; the main one writes
            if self.process.is_main:
                save_checkpoint(self.settings.out, best, self.task.kind, **self.checkpoint_entries())
        if self.budget:
            self.budget.evaluated(time.perf_counter() - started)
            self.progress.seconds_used, self.progress.evaluation_seconds = self.budget.seconds_used(), self.budget.evaluation_seconds
        self.parallel.save_resume_state(self)
        if self.process.is_main:
            self.write_reports()

    def checkpoint_entries(self):
        """What every checkpoint of the run stores besides the weights."""
        return {**self.task.checkpoint_metadata(), "step": self.progress.step, "tokens_seen": self.progress.tokens_seen,
                "val_loss": self.progress.evaluations[-1]["val_loss"] if self.progress.evaluations else None,
                "training_settings": self.settings.as_dict()}

    def resumed_progress(self):
        """--resume: the last state's weights, optimizer and random generators put in place; its Progress."""
        progress = Progress(**self.parallel.restore_resume_state(self))
        progress.step_losses = [tuple(entry) for entry in progress.step_losses]
        self.say(f"resuming from {self.parallel.resume_path()} at step {progress.step}")
        if progress.step >= (progress.planned_steps or self.step_limit):
            done = (f"the {progress.step} steps its --max-time planned; start a new run to train further"
                    if progress.planned_steps else f"{progress.step} steps; raise --max-steps or --epochs to continue")
            raise UserError(f"{self.parallel.resume_path()} has already trained {done}")
        return progress

    def load_best(self):
        """The weights of the best checkpoint (lowest validation loss) in the model, for a final evaluation."""
        self.process.wait_for_main_process()  # it may still be writing the best checkpoint
        best = read_checkpoint(self.settings.out, kinds=(self.task.kind,))
        self.model, self.parallel = self.parallel.best_model(self.model, best)

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

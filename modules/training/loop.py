"""The one training loop, used by train.py, fine_tune_classifier.py and fine_tune_instructional.py.

A run, in the order of this file:

1. Before the first step: the memory plan (a run that will not fit stops there), the model as the run's
   parallelism wants it (parallel.py: one process, DDP or FSDP, chosen once), the optimizer, the precision,
   the loss compiled or not (--compile-loss), and with --max-time the steps that fit, each said on one line.
2. Each optimizer step (Trainer.train_step, read top to bottom): the learning rate; this process's
   micro-batches; for each, forward under autocast, loss, backward; clipping; the optimizer step.
3. Every `eval_interval` steps and after the last: evaluation, the sample, the best model and the last state
   (--resume) saved, the reports written. With --max-time the steps that fit are planned again every few steps.

A script says what it trains with a TrainingTask (task.py). Each step's samples and learning rate follow
from the step number (schedule.py), so a resumed run repeats the steps of an uninterrupted one.
"""
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

from ..checkpoint import read_checkpoint
from ..files import exclusive_output
from ..speed.compilation import loss_compilation
from ..speed.memory import keep_freed_memory
from ..speed.precision import describe_precision, mixed_precision, resolve_dtype
from .evaluation import evaluate, forward_passes, samples_evaluated
from .interrupt import StopRequest
from .memory_plan import RunShape, check_fits, memory_per_process
from .optimizer import make_optimizer
from .parallel import choose_parallelism
from .reports import describe_evaluation, write_reports
from .resume import Progress, random_state, restore_random_state, resumed_progress
from .schedule import (REPLAN_STEPS, BatchPlan, TimeBudget, default_warmup_steps, learning_rate_factor,
                       rehearsed_pace)


def train(model, task, settings, process):
    """Train `model` on `task` as `settings` say; the Trainer returned serves the script's final evaluation."""
    trainer = Trainer(model, task, settings, process)
    with exclusive_output(settings.out) if process.is_main else nullcontext():
        trainer.run()
    return trainer


class Trainer:
    """One training run: its model, optimizer, precision and batches, and how far it has got."""

    def __init__(self, model, task, settings, process):
        self.task, self.settings, self.process = task, settings, process
        self.parallel = choose_parallelism(settings, process)
        self.batches = BatchPlan(len(task.train_set), settings.batch_size, settings.micro_batch_size, process.rank,
                                 process.world_size, settings.seed)
        self.step_limit = settings.max_steps or settings.epochs * self.batches.steps_per_epoch
        self.eval_interval = settings.eval_interval or self.batches.steps_per_epoch
        # The memory each process will need, before the model takes any: a run that will not fit stops here.
        shape = RunShape(self.parallel.memory_strategy, process.world_size, self.batches.micro_batch,
                         task.longest_batch_tokens(), resolve_dtype(settings.dtype, process.device).itemsize,
                         settings.activation_checkpointing, process.device.type)
        self.say(check_fits(model, shape, memory_per_process(process.device), can_lora=task.kind != "lm").describe())
        self.model, self.training_model = self.parallel.prepare(model)
        if process.device.type == "cpu":
            keep_freed_memory()  # a fifth faster on CPU: each step reuses the last one's pages
        self.optimizer = make_optimizer(self.model, settings.lr, settings.weight_decay, process.device)
        self.autocast, self.scaler = mixed_precision(settings.dtype, process.device)
        self.data_signature = {"global_batch": settings.batch_size, "train_samples": len(task.train_set)}
        self.progress, self.budget = Progress(), None
        if settings.resume:  # the last state's weights, optimizer and random generators put in place
            saved = self.parallel.restore_resume_state(self)
            self.progress = resumed_progress(saved, self.parallel.resume_path(), self.step_limit)
            self.say(f"resuming from {self.parallel.resume_path()} at step {self.progress.step}")

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
            self.budget = TimeBudget(self.settings.max_time, self.eval_interval, self.step_limit, self.progress.seconds_used,
                                     self.progress.evaluation_seconds, slowest=self.parallel.maxima)
            if first_plan:
                self.progress.planned_steps = self.budget.plan(0, step_seconds)
                self.say(f"steps: {self.progress.planned_steps:,} fit in --max-time {self.settings.max_time:g} s, at "
                         f"{step_seconds:.3f} s a step and {self.budget.evaluation_seconds:.1f} s an evaluation "
                         f"(planned again every {REPLAN_STEPS} steps)")
        if self.progress.warmup_steps is None:  # fixed from here on, wherever --max-time moves the end
            given = self.settings.warmup_steps
            self.progress.warmup_steps = given if given is not None else default_warmup_steps(self.total_steps)

    @property
    def total_steps(self):
        return self.progress.planned_steps or self.step_limit

    def rehearsed_pace(self):
        """(seconds per step, seconds per evaluation) for --max-time's first plan (schedule.py), leaving the
        weights, the optimizer and the random generators as they were."""
        random_generators = random_state(self.process.device)
        passes = sum(forward_passes(samples_evaluated(dataset, self.settings.eval_batches, self.settings.batch_size),
                                    self.batches.micro_batch, self.parallel) for dataset in (self.task.train_set, self.task.val_set))
        pace = rehearsed_pace(lambda: self.train_step(rehearsal=True), self.sample, passes, self.batches.accumulation)
        restore_random_state(random_generators, self.process.device)
        return pace

    # ---------------------------------------------------------------- one step
    def train_step(self, rehearsal=False):
        """One optimizer step over the global batch; returns (mean loss, tokens trained on by all processes).
        A `rehearsal` (--max-time's first plan) computes the gradients of the step and stops there."""
        step = self.progress.step
        # The learning rate of this step: warmup, then the schedule's decay (schedule.py). (The warmup is
        # None only in --max-time's rehearsal, before the first plan, whose learning rate is never used.)
        lr = self.settings.lr * learning_rate_factor(step, self.progress.warmup_steps or 0, self.total_steps,
                                                     self.settings.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # This process's share of the step's samples, a micro-batch at a time: each micro-batch's mean loss
        # counts for its part of the share, so the gradients add up to the gradient of the share's mean.
        micro_batches = self.batches.micro_batches(step)
        loss_sum, tokens = torch.zeros((), device=self.process.device), 0
        for index, indices in enumerate(micro_batches):
            batch = self.task.batch(self.task.train_set, indices, self.process.device)
            # The processes exchange gradients once a step, in the backward pass of the last micro-batch.
            with self.parallel.gradient_sync(self.training_model, last=index == len(micro_batches) - 1):
                with self.autocast:  # the matrix products in --dtype, the loss in float32
                    loss = self.task.loss(self.training_model, batch) / len(micro_batches)
                # A float16 GradScaler scales the loss up, so that small gradients do not underflow.
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += loss.detach()
            tokens += self.task.num_tokens(batch)
        if rehearsal:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        # Clipping: the gradient norm at most grad_clip (unscaled first, so that the norm is the true one).
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
        loss_value = self.parallel.sum(loss_sum).item() / self.process.world_size
        tokens *= self.process.world_size
        self.progress.step += 1
        self.progress.tokens_seen += tokens
        self.progress.step_losses.append((self.progress.step, self.progress.tokens_seen, loss_value))
        return loss_value, tokens

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
                    if stop.requested_anywhere(self.parallel, self.process.device):
                        self.save_and_stop(progress_bar)
        finally:
            # DDP's wrapper holds the process group. Freed after the script has left the group (training_run),
            # gloo's destructor waited for its threads forever: 1 run in 5 of two CPU processes hung at exit.
            self.training_model = self.model
        progress_bar.close()

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
    def evaluate(self, dataset, max_batches=None):
        """{metric: mean} over the first `max_batches` batches of `dataset` (all of it if None): evaluation.py."""
        samples = samples_evaluated(dataset, max_batches, self.settings.batch_size)
        return evaluate(self.task, self.model, dataset, samples, self.batches.micro_batch, self.parallel, self.autocast,
                        self.process.device)

    def sample(self):
        """The task's sample text on the main process (None on the others), the model in eval mode."""
        sample = self.parallel.sample(self.model.eval(), self.task)
        self.model.train()
        return sample

    def evaluate_and_save(self):
        """Evaluation, the sample, the best model and the last state saved, the reports written."""
        started = time.perf_counter()
        record = {"step": self.progress.step, "tokens_seen": self.progress.tokens_seen}
        for split, dataset in (("train", self.task.train_set), ("val", self.task.val_set)):
            metrics = self.evaluate(dataset, self.settings.eval_batches)
            record.update({f"{split}_{name}": value for name, value in metrics.items()})
        self.progress.evaluations.append(record)
        sample = self.progress.last_sample = self.sample()
        self.say(describe_evaluation(record, self.total_steps, sample))
        if record["val_loss"] < self.progress.best_val_loss:
            self.progress.best_val_loss = record["val_loss"]
            self.parallel.save_checkpoint(self.settings.out, self.model, self.task.kind, **self.checkpoint_entries())
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

    def load_best(self):
        """The weights of the best checkpoint (lowest validation loss) in the model, for a final evaluation."""
        self.process.wait_for_main_process()  # it may still be writing the best checkpoint
        best = read_checkpoint(self.settings.out, kinds=(self.task.kind,))
        self.model, self.parallel = self.parallel.best_model(self.model, best)

    def write_reports(self, extra_metrics=None):
        """The metrics file and the loss plot beside the checkpoint (main process only); returns the metrics."""
        return write_reports(self.settings.out, self.progress, extra_metrics)

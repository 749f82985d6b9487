"""The one training loop, used by train.py, fine_tune_classifier.py and fine_tune_instructional.py.

Each step: the step's samples, forward pass and loss, backward pass, gradient clipping, optimizer step.
Every `eval_interval` steps: evaluate on training and validation batches, keep the best model, save the
last state (for --resume) and the reports. A script describes what it trains with a TrainingTask.

Batches are the same whatever the number of processes: `batch_size` is the global batch of one optimizer
step. Each step draws its samples from a seeded permutation of the training set; each process takes its
share and accumulates gradients over micro-batches until its share is done.
"""
import math
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

from ..checkpoint import read_checkpoint, save_checkpoint
from ..errors import UserError
from ..files import exclusive_output
from ..lora import merge_lora
from ..speed import compiled_model, describe_precision, keep_freed_memory
from .batches import BatchPlan
from .interrupt import StopRequest
from .optimizer import make_optimizer
from .reports import last_checkpoint_path, plot_path, plot_training, write_metrics
from .resume import Progress, restore_train_state, train_state
from .schedule import autocast_context, learning_rate_factor
from .time_budget import plan_steps


def train(model, task, settings, process):
    """Train `model` on `task` as `settings` (a TrainingSettings) say; returns the Trainer, whose
    evaluate(), load_best() and write_reports() serve the script's final evaluation."""
    trainer = Trainer(model, task, settings, process)
    with exclusive_output(settings.out) if process.is_main else nullcontext():
        trainer.run()
    return trainer


class Trainer:
    """One training run: its model, optimizer and schedule, and how far it has got."""

    def __init__(self, model, task, settings, process):
        self.task, self.settings, self.process = task, settings, process
        self.batches = BatchPlan(len(task.train_set), settings.batch_size, settings.micro_batch_size, process.rank,
                                 process.world_size, settings.seed)
        # The steps the flags allow; with --max-time, run() plans the steps that fit in the time.
        self.step_limit = settings.max_steps or settings.epochs * self.batches.steps_per_epoch
        self.eval_interval = settings.eval_interval or self.batches.steps_per_epoch

        self.model = model.to(process.device)
        if process.device.type == "cpu":
            keep_freed_memory()  # a fifth faster on CPU: each step reuses the last one's pages
        self.optimizer = make_optimizer(self.model, settings.lr, settings.weight_decay, process.device)
        self.autocast, self.scaler = autocast_context(settings.dtype, process.device)
        if process.is_main:
            tqdm.write(describe_precision(settings.dtype, process.device))
        self.data_signature = {"global_batch": settings.batch_size, "train_samples": len(task.train_set)}
        self.progress = Progress()
        if settings.resume:
            self.progress = restore_train_state(last_checkpoint_path(settings.out), task.kind, self.model,
                                                self.optimizer, self.scaler, self.data_signature, process.device)
            if self.progress.step >= self.total_steps:
                done = (f"the {self.progress.step} steps its --max-time planned; start a new run to train further"
                        if self.progress.planned_steps else
                        f"{self.progress.step} steps; raise --max-steps or --epochs to continue")
                raise UserError(f"{last_checkpoint_path(settings.out)} has already trained {done}")
        self.training_model = compiled_model(self.model) if settings.compile else self.model
        if process.world_size > 1:
            device_ids = [process.device.index] if process.device.type == "cuda" else None
            self.training_model = torch.nn.parallel.DistributedDataParallel(self.training_model, device_ids=device_ids)

    # ---------------------------------------------------------------- one step
    @property
    def total_steps(self):
        return self.progress.planned_steps or self.step_limit

    def train_step(self):
        """One optimizer step over the global batch; returns (mean loss, tokens trained on by all processes)."""
        warmup = self.settings.warmup_steps if self.settings.warmup_steps is not None else max(1, self.total_steps // 20)
        for group in self.optimizer.param_groups:
            group["lr"] = self.settings.lr * learning_rate_factor(self.progress.step, warmup, self.total_steps,
                                                                  self.settings.lr_schedule)
        total_loss, tokens = self.forward_backward(self.progress.step)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.settings.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = self.process.all_reduce_sum(total_loss).item() / self.process.world_size
        tokens *= self.process.world_size
        self.progress.step += 1
        self.progress.tokens_seen += tokens
        self.progress.step_losses.append((self.progress.step, self.progress.tokens_seen, loss_value))
        return loss_value, tokens

    def forward_backward(self, step):
        """Gradients of this process's share of step `step`'s samples, micro-batch by micro-batch; returns
        (the mean loss as a tensor, tokens)."""
        total_loss = torch.zeros((), device=self.process.device)
        tokens = 0
        micro_batches = self.batches.micro_batches(step)
        for micro_step, indices in enumerate(micro_batches):
            batch = self._batch(self.task.train_set, indices)
            last = micro_step == len(micro_batches) - 1
            # DDP averages gradients across processes after every backward; between micro-batches of
            # one step that communication is wasted, so only the last backward synchronises.
            sync = nullcontext() if last or self.process.world_size == 1 else self.training_model.no_sync()
            with sync:
                with self.autocast:
                    loss = self.task.loss(self.training_model, batch) / len(micro_batches)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total_loss += loss.detach()
            tokens += self.task.num_tokens(batch)
        return total_loss, tokens

    def _batch(self, dataset, indices):
        batch = self.task.collate([dataset[i] for i in indices])
        return {key: value.to(self.process.device, non_blocking=True) if torch.is_tensor(value) else value
                for key, value in batch.items()}

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, dataset, max_batches=None):
        """{metric: mean} over the first `max_batches` micro-batches of `dataset` (all if None), shared out
        over the processes."""
        was_training = self.model.training
        self.model.eval()
        batches = math.ceil(len(dataset) / self.batches.micro_batch)
        if max_batches:
            batches = min(batches, max_batches)
        sums = {name: [0.0, 0] for name in self.task.metric_names}
        for batch_index in range(self.process.rank, batches, self.process.world_size):
            start = batch_index * self.batches.micro_batch
            batch = self._batch(dataset, range(start, min(start + self.batches.micro_batch, len(dataset))))
            with self.autocast:
                for name, (total, count) in self.task.metrics(self.model, batch).items():
                    sums[name][0] += total
                    sums[name][1] += count
        packed = torch.tensor(list(sums.values()), dtype=torch.float64, device=self.process.device)
        packed = self.process.all_reduce_sum(packed)
        self.model.train(was_training)
        return {name: (total / count if count else math.nan) for name, (total, count) in zip(sums, packed.tolist())}

    def evaluation(self):
        """(record of the metrics on training and validation batches, the task's sample text or None)."""
        train_metrics = self.evaluate(self.task.train_set, self.settings.eval_batches)
        val_metrics = self.evaluate(self.task.val_set, self.settings.eval_batches)
        record = {"step": self.progress.step, "tokens_seen": self.progress.tokens_seen,
                  **{f"train_{name}": value for name, value in train_metrics.items()},
                  **{f"val_{name}": value for name, value in val_metrics.items()}}
        sample = None
        if self.process.is_main:
            self.model.eval()
            sample = self.task.sample(self.model)
            self.model.train()
        return record, sample

    def _evaluate_and_save(self):
        record, sample = self.evaluation()
        self.progress.evaluations.append(record)
        improved = record["val_loss"] < self.progress.best_val_loss
        self.progress.best_val_loss = min(self.progress.best_val_loss, record["val_loss"])
        if not self.process.is_main:
            return
        shown = " | ".join(f"{key} {value:.4f}" for key, value in record.items() if key.startswith(("train_", "val_")))
        tqdm.write(f"step {self.progress.step}/{self.total_steps} | {shown}")
        if sample:
            self.progress.last_sample = sample
            tqdm.write("sample:\n    " + sample.replace("\n", "\n    "))
        if improved:
            self._save(self.settings.out, resumable=False)
        self._save(last_checkpoint_path(self.settings.out), resumable=True)
        self.write_reports()

    # ---------------------------------------------------------------- checkpoints and reports
    def _save(self, path, resumable):
        extra = {**self.task.checkpoint_metadata(), "step": self.progress.step, "tokens_seen": self.progress.tokens_seen,
                 "val_loss": self.progress.evaluations[-1]["val_loss"] if self.progress.evaluations else None,
                 "training_settings": self.settings.as_dict()}
        if resumable:
            extra["train_state"] = train_state(self.model, self.optimizer, self.scaler, self.progress,
                                               self.data_signature, self.process.device)
        save_checkpoint(path, self.model, self.task.kind, **extra)

    def load_best(self):
        """Put the weights of the best checkpoint (lowest validation loss) into the model, for a final
        evaluation; LoRA adapters are merged first, as the checkpoint holds merged weights."""
        self.process.wait_for_main_process()  # it may still be writing the best checkpoint
        merge_lora(self.model)
        self.model.load_state_dict(read_checkpoint(self.settings.out, kinds=(self.task.kind,))["model_state_dict"])

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

    # ---------------------------------------------------------------- run
    def run(self):
        self.model.eval()
        with self.autocast:
            self.task.choose_loss_function(self.model, self._batch(self.task.train_set, self.batches.micro_batches(0)[0]))
        self.training_model.train()
        if self.settings.max_time and self.progress.planned_steps is None:
            self.progress.planned_steps = plan_steps(self, self.settings.max_time)
        progress_bar = tqdm(total=self.total_steps, initial=self.progress.step, desc="training", unit="step",
                            disable=not self.process.is_main, dynamic_ncols=True)
        with StopRequest() as stop:
            while self.progress.step < self.total_steps:
                started = time.perf_counter()
                loss, tokens = self.train_step()
                progress_bar.update()
                progress_bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                         tokens_per_s=f"{tokens / (time.perf_counter() - started):,.0f}")
                if self.progress.step % self.eval_interval == 0 or self.progress.step == self.total_steps:
                    self._evaluate_and_save()
                if self._stop_requested(stop):
                    self._save_and_stop(progress_bar)
        progress_bar.close()

    def _stop_requested(self, stop):
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.process.device)
        return self.process.all_reduce_sum(flag).item() > 0

    def _save_and_stop(self, progress_bar):
        if self.process.is_main:
            self._save(last_checkpoint_path(self.settings.out), resumable=True)
            self.write_reports()
            progress_bar.close()
            tqdm.write(f"interrupted after step {self.progress.step}: saved {last_checkpoint_path(self.settings.out)}; "
                       "run the same command with --resume to continue")
        raise KeyboardInterrupt


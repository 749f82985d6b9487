"""What a training run leaves beside its checkpoint: where each file goes, the metrics file and the loss plot.

    checkpoints/model.pt            the best model (by validation loss)
    checkpoints/model.last.pt       the last step, with everything --resume needs
    checkpoints/model.metrics.json  final metrics and every evaluation, for programs
    checkpoints/model.loss.png      the loss curves, for people
"""
import json
from pathlib import Path

from ..files import atomic_file, atomic_write_text


def last_checkpoint_path(out):
    """checkpoints/model.pt -> checkpoints/model.last.pt, the checkpoint that resumes training."""
    return Path(out).with_suffix(".last.pt")


def metrics_path(out):
    return Path(out).with_suffix(".metrics.json")


def plot_path(out):
    return Path(out).with_suffix(".loss.png")


def describe_evaluation(record, total_steps, sample):
    """"step 200/400 | train_loss 5.1 | val_loss 5.3 ...", and the sample below it, indented."""
    shown = " | ".join(f"{key} {value:.4f}" for key, value in record.items() if key.startswith(("train_", "val_")))
    line = f"step {record['step']}/{total_steps} | {shown}"
    return line + ("\nsample:\n    " + sample.replace("\n", "\n    ") if sample else "")


def final_metrics(progress):
    """The metrics file's entries: the last evaluation's metrics, then the run's record."""
    last = progress.evaluations[-1] if progress.evaluations else {}
    return {**{key: value for key, value in last.items() if key.startswith(("train_", "val_"))},
            "best_val_loss": progress.best_val_loss, "steps": progress.step, "tokens_seen": progress.tokens_seen,
            "sample": progress.last_sample, "evaluations": progress.evaluations}


def write_reports(out, progress, extra_metrics=None):
    """The metrics file and the loss plot beside the checkpoint `out`; returns the metrics."""
    metrics = {**final_metrics(progress), **(extra_metrics or {})}
    write_metrics(out, metrics)
    plot_training(plot_path(out), progress.step_losses, progress.evaluations)
    return metrics


def write_metrics(out, metrics):
    """`<checkpoint>.metrics.json`, written atomically."""
    atomic_write_text(metrics_path(out), json.dumps(metrics, indent=2))


def plot_training(path, step_losses, evaluations):
    """Training and validation loss against tokens seen, with bits per byte on a second axis when they
    were measured, plus any other evaluated metric (accuracy) in a plot of its own."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    extra = sorted({key[4:] for record in evaluations for key in record if key.startswith("val_")} - {"loss", "bpb"})
    figure, axes = plt.subplots(1, 1 + len(extra), figsize=(6 * (1 + len(extra)), 4), squeeze=False)
    loss_axis = axes[0][0]
    if step_losses:
        _, tokens, losses = zip(*step_losses)
        loss_axis.plot(tokens, losses, alpha=0.4, label="training loss (each step)")
    for split in ("train", "val"):
        points = [(record["tokens_seen"], record[f"{split}_loss"]) for record in evaluations]
        if points:
            loss_axis.plot(*zip(*points), marker="o", label=f"{'training' if split == 'train' else 'validation'} loss (evaluation)")
    loss_axis.set(xlabel="tokens seen", ylabel="loss (nats per token)", title="loss")
    loss_axis.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter())  # 200k, not 200000
    loss_axis.legend()
    if evaluations and "val_bpb" in evaluations[-1]:
        # Bits per byte are the loss times a constant of the text (bytes per token, ln 2), so one axis
        # serves both: the right one reads the validation curve in bits per byte.
        ratio = evaluations[-1]["val_bpb"] / evaluations[-1]["val_loss"]
        loss_axis.secondary_yaxis("right", functions=(lambda loss: loss * ratio, lambda bpb: bpb / ratio)).set_ylabel(
            "validation bits per byte")
    for axis, name in zip(axes[0][1:], extra):
        for split in ("train", "val"):
            axis.plot([r["step"] for r in evaluations], [r[f"{split}_{name}"] for r in evaluations], marker="o", label=split)
        axis.set(xlabel="step", ylabel=name, title=name)
        axis.legend()
    figure.tight_layout()
    try:
        with atomic_file(path) as file:
            figure.savefig(file, format="png", dpi=100)
    finally:
        plt.close(figure)

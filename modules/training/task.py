"""TrainingTask: what a script trains, in the terms the training loop needs."""
import torch
from torch.utils.data import default_collate

from ..loss import next_token_loss


class TrainingTask:
    """Override what differs; the defaults are next-token prediction on (input_ids, targets) samples."""

    kind = "lm"  # the checkpoint's kind
    metric_names = ("loss",)  # what metrics() returns; every process must know them, even one with no batch
    loss_function = staticmethod(next_token_loss)  # (logits, targets) -> mean loss

    def __init__(self, train_set, val_set):
        self.train_set = train_set
        self.val_set = val_set

    def collate(self, samples):
        """A list of samples -> a batch, a dict of tensors."""
        input_ids, targets = default_collate(samples)
        return {"input_ids": input_ids, "targets": targets}

    def batch(self, dataset, indices, device):
        """The samples `indices` of `dataset`, collated and moved to `device`."""
        batch = self.collate([dataset[i] for i in indices])
        return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
                for key, value in batch.items()}

    def logits_and_targets(self, model, batch):
        """What the loss compares: the model's logits for the batch and the batch's targets."""
        return model(batch["input_ids"]), batch["targets"]

    def loss(self, model, batch):
        """Mean loss of a batch (what is minimised)."""
        return self.loss_function(*self.logits_and_targets(model, batch))

    def metrics(self, model, batch):
        """{name: (sum, count)} of a batch for evaluation; averaged over all evaluated batches."""
        size = len(batch["input_ids"])
        return {"loss": (self.loss(model, batch).item() * size, size)}

    def longest_batch_tokens(self):
        """The most tokens a training batch can be wide (the memory plan's context): here every window is."""
        return self.collate([self.train_set[0]])["input_ids"].shape[1]

    def num_tokens(self, batch):
        """Tokens trained on in a batch, for the tokens-per-second shown while training."""
        return batch["input_ids"].numel()

    def sample(self, model):
        """Text to print at each evaluation, to watch the model learn (None for nothing)."""
        return None

    def checkpoint_metadata(self):
        """Entries stored in every checkpoint besides the weights (label names, data settings...)."""
        return {}

"""The objective GPT-2 learns: predict each next token.

At every position the model outputs one logit per vocabulary token; the loss is the cross-entropy of the
token that really comes next, averaged over the positions that count. Targets equal to IGNORE_INDEX do
not count (padding, or the prompt when only the answer is trained on).
"""
from torch.nn import functional as F

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index


def next_token_loss(logits, targets):
    """Mean cross-entropy over the counted targets: logits (batch, tokens, vocab), targets (batch, tokens).

    The sum is divided by the number of counted targets, at least 1: a batch where none counts has loss
    0, where the mean would be NaN (0/0) and poison the weights. Computed in float32 under autocast."""
    targets = targets.flatten()
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)

"""LoRA (Hu et al., 2021): fine-tune a large model by training a small low-rank update of its weights.

A frozen Linear computes x W^T; LoRA adds (alpha / rank) * x A B with A (in x rank) and B (rank x out),
rank much smaller than in and out. B starts at zero, so training starts from exactly the pretrained
model, and only A and B (a fraction of a percent of the parameters) receive gradients and optimizer
state. Dividing by rank (the paper's scaling; the original project scaled by alpha alone) lets the
rank change without retuning the learning rate.

After training, merge_lora() folds each update into its Linear (W + scale * (A B)^T): the model is a
plain GPTModel again, as fast as before, and its checkpoint loads like any other.
"""
import math

import torch
from torch import nn

from .errors import check_flag

# The Linear layers of a transformer block; the embeddings and the (tied) output head stay as they are.
LORA_TARGETS = ("qkv_proj", "out_proj", "expand", "project")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        if rank < 1:
            raise ValueError(f"the LoRA rank must be at least 1, not {rank}")
        self.linear = linear
        self.linear.requires_grad_(False)
        self.scaling = alpha / rank
        self.A = nn.Parameter(torch.empty(linear.in_features, rank, device=linear.weight.device, dtype=linear.weight.dtype))
        self.B = nn.Parameter(torch.zeros(rank, linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype))
        # A as nn.Linear initialises its weights (the paper's choice); B = 0 makes the update start at zero.
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x):
        return self.linear(x) + self.scaling * (x @ self.A @ self.B)

    def merged_weight(self):
        """The Linear's weight with the update folded in: W + scale * (A B)^T, shaped (out, in) like W."""
        return self.linear.weight + self.scaling * (self.A @ self.B).T


def apply_lora(model, rank, alpha):
    """Wrap the Linear layers of every transformer block in LoRALinear and freeze everything else.

    Returns the model (changed in place). Parameters that must still train fully (a new
    classification head) are unfrozen by the caller afterwards."""
    model.requires_grad_(False)
    for block in model.blocks:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if name in LORA_TARGETS and isinstance(child, nn.Linear):
                    parent.register_module(name, LoRALinear(child, rank, alpha))
    return model


def add_lora_args(parser):
    """--lora-rank and --lora-alpha: one interface for every fine-tuning script."""
    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora-rank", type=int, default=0,
                       help="train rank-r LoRA adapters on every Linear of the transformer blocks, with the "
                            "blocks' weights frozen, instead of the weights themselves; 0 for none (default: "
                            "%(default)s). The adapters are merged into the weights when saved; a classifier's new "
                            "head trains in full")
    group.add_argument("--lora-alpha", type=float, default=None,
                       help="LoRA scale: the update is multiplied by alpha / rank (default: the rank, a scale of 1)")
    return group


def lora_from_flags(model, rank, alpha):
    """--lora-rank and --lora-alpha applied to `model` (nothing for rank 0); returns the settings taken,
    {"rank", "alpha"} or None, for the checkpoint. A flag out of range ends in one line naming it."""
    check_flag("lora_rank", rank, lambda value: value >= 0, ">= 0 (0 for no LoRA)")
    check_flag("lora_alpha", alpha, lambda value: value > 0, "> 0")
    if not rank:
        return None
    alpha = float(rank) if alpha is None else alpha
    apply_lora(model, rank, alpha)
    return {"rank": rank, "alpha": alpha}


def has_lora(model):
    return any(isinstance(module, LoRALinear) for module in model.modules())


@torch.no_grad()
def merge_lora(model):
    """Replace every LoRALinear by a plain nn.Linear holding the merged weight (in place); returns the model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                child.linear.weight.copy_(child.merged_weight())
                parent.register_module(name, child.linear)
    return model


@torch.no_grad()
def merged_state_dict(model):
    """model.state_dict() as the merged model would have it, leaving `model` unchanged: the form in
    which checkpoints store weights, so every checkpoint loads into a plain GPTModel."""
    state = model.state_dict(keep_vars=True)
    # Each adapter's entries by the name the state dict gives them, which a wrapper of its block (activation
    # checkpointing) leaves out of the module's own name.
    names = {id(tensor): name for name, tensor in state.items()}
    state = {name: tensor.detach() for name, tensor in state.items()}
    for module in model.modules():
        if isinstance(module, LoRALinear):
            prefix = names[id(module.A)].removesuffix("A")
            del state[prefix + "A"], state[prefix + "B"], state[prefix + "linear.weight"]
            state[prefix + "weight"] = module.merged_weight()
            if prefix + "linear.bias" in state:
                state[prefix + "bias"] = state.pop(prefix + "linear.bias")
    return state


def lora_state_dict(model):
    """The unmerged state of a model with LoRA layers (frozen weights and adapters apart), {} without
    them: what resuming a LoRA run needs, since checkpoints hold merged weights."""
    return model.state_dict() if has_lora(model) else {}

"""Activation checkpointing: keep only each transformer block's input for the backward pass, and run the
block's forward again when the backward pass reaches it.

The backward pass needs what the forward pass computed: a block of GPT-2 keeps two copies of the residual
stream and 14 more numbers per token and embedding dimension (the inputs of its LayerNorms, matrix
products and GELU; memory_plan.py), 36 bytes under bfloat16 autocast: 1.7 GB per sample of 1,024 tokens
for the 36 blocks of GPT-2 774M. Checkpointed, a block keeps its float32 input alone, 4 bytes, and only
the block being recomputed holds the rest: the blocks' activations shrink about ninefold, for one more
forward pass of each block per step (about a third more compute).

Dropout draws the same masks in the recomputation (the checkpoint restores the random state), so losses
and gradients are those of the run without checkpointing. Applied from the training code: each block of
the model's list is put inside PyTorch's checkpoint wrapper (as torchtitan does before fully_shard), so
the blocks themselves stay plain GPT-2, and the wrapper's state-dict hooks keep the parameters' names (in
checkpoints, in FSDP's sharded resume state). It checkpoints through torch.utils.checkpoint, which
torch.compile (--compile) traces. With FSDP, a block's weights are gathered again for its recomputation as
for its backward pass.
"""
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def checkpoint_activations(model):
    """Make every transformer block of `model` recompute its forward pass in the backward pass (before DDP
    or FSDP wrap the model); returns the model."""
    for index, block in enumerate(model.blocks):
        model.blocks[index] = checkpoint_wrapper(block)
    return model

"""Fully Sharded Data Parallel (FSDP2): each of N processes keeps 1/N of the weights, gradients and
optimizer state, and gathers a block's whole weights only while the block runs.

DDP keeps a whole copy of the model on every process: 16 bytes a parameter with AdamW in float32
(weights, gradients, two moments), 24.9 GB for GPT-2 1558M, more than a 24 GB GPU holds however many
there are. Sharded, each process holds 16/N bytes a parameter, plus the weights of the blocks running
now. As torchtitan shards a transformer:

- each transformer block is one unit: before its forward (and again before its backward) its weights are
  all-gathered, after it they are dropped, and its gradients are reduce-scattered so each process keeps
  the gradient of its own shard;
- the root unit holds what is left: the embeddings, the final LayerNorm and the head. GPT-2's head shares
  its matrix with the token embedding, and a shared matrix must live in exactly one unit (two units
  would each gather and reduce their own copy); the root is the unit that holds both of its users;
- the mixed-precision policy follows --dtype: the weights are gathered and computed in bfloat16 (half
  the bytes to send), the gradients are reduced in float32, and the shards that the optimizer updates,
  with its state, stay float32.

The optimizer, gradient clipping and torch.distributed.checkpoint work on the shards (DTensors) as they
are. What needs the whole model, the one-file checkpoint that every loader reads, is gathered here.
"""
from contextlib import contextmanager

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..checkpoint import model_from_state_dict
from ..errors import UserError
from ..lora import LoRALinear, has_lora
from ..speed.precision import resolve_dtype


def shard_model(model, dtype_name, device):
    """Shard `model` (a GPTModel, LoRA layers included, already on `device`) over the process group, in
    place: one FSDP unit per transformer block, then the root. Returns the model."""
    policy = mixed_precision_policy(dtype_name, device)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def mixed_precision_policy(dtype_name, device):
    """bfloat16 weights and computation with float32 gradient reduction, or float32 throughout."""
    dtype = shardable_dtype(dtype_name, device)
    if dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shardable_dtype(dtype_name, device):
    """The dtype --dtype `dtype_name` stands for, refused when float16: a gradient scaler would have to
    work over the shards, and the sharded resume state (--parallel fsdp writes it with one process too)
    keeps none."""
    dtype = resolve_dtype(dtype_name, device)
    if dtype == torch.float16:
        raise UserError("--parallel fsdp trains in bfloat16 or float32, not float16 (float16 would need a gradient "
                        "scaler over the shards): use --dtype bfloat16 or --dtype float32")
    return dtype


@contextmanager
def root_gathered(model):
    """Within the block, the root unit's weights (the embeddings, the final LayerNorm, the head) are
    gathered, in the computation's precision: generation sizes its KV cache from the token embedding's
    dtype, which must be the one the blocks compute in. Every process must enter it."""
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def gathered_model(model):
    """The whole of a sharded `model` as a plain GPTModel on the CPU of the main process (LoRA layers
    kept, as in `model`), None on the others: what save_checkpoint writes. Every process must call it,
    since each sends its shards. The weights are gathered one tensor at a time into CPU memory, so no
    GPU ever holds the whole model at once."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if not state:  # cpu_offload leaves the gathered tensors on the main process only
        return None
    lora = None
    if has_lora(model):
        layer = next(module for module in model.modules() if isinstance(module, LoRALinear))
        lora = (layer.A.shape[1], layer.scaling * layer.A.shape[1])
    return model_from_state_dict(model.config, state, lora)


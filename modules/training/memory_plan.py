"""The memory a training run will need in each process, worked out before the first step.

Per process, in bytes:

    weights      float32 master weights: all of them, or 1/N under FSDP plus the weights gathered for the
                 running blocks (the root unit, the block running and the one fetched ahead), in the
                 computation's precision; under autocast, the 16-bit copies of the trained matrices
    gradients    float32, of the trained parameters: all (DDP adds its buckets, as big again), or 1/N
                 under FSDP plus the gathered units' gradients before they are reduce-scattered
    optimizer    AdamW's two float32 moments per trained parameter, or 1/N of them under FSDP
    activations  what the backward pass needs from the forward pass, per micro-batch: per block and token,
                 2 copies of the residual stream and 14 numbers per embedding dimension in the computation's
                 precision (the inputs of the LayerNorms, matrix products and GELU, counted from this code
                 with saved-tensor hooks: tests/test_fsdp_memory_plan.py), the attention matrices where
                 PyTorch's CPU kernel needs them (dropout on the CPU), and the logits with their softmax;
                 with activation checkpointing, each block's input and one block's activations
    runtime      the process itself: Python and PyTorch's libraries, on a GPU the CUDA context

The plan is checked against the device's memory (a GPU's, or the RAM left for each process on this
machine), and a plan that does not fit says which flag would make it fit.
"""
import os
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..checkpoint import empty_model
from ..device import available_memory
from ..errors import UserError
from ..lora import LoRALinear, apply_lora

GB = 1e9
RUNTIME_BYTES = {"cuda": int(0.6 * GB), "cpu": int(0.5 * GB)}
ADAM_MOMENTS = 2


@dataclass(frozen=True)
class RunShape:
    """What the memory of a run depends on, besides the model."""

    strategy: str  # "one process", "ddp" or "fsdp"
    processes: int
    micro_batch: int
    context: int
    compute_bytes: int  # 2 for bfloat16 or float16, 4 for float32
    activation_checkpointing: bool = False
    device_type: str = "cuda"


@dataclass(frozen=True)
class MemoryPlan:
    shape: RunShape
    weights: int
    gradients: int
    optimizer: int
    activations: int
    runtime: int

    @property
    def total(self):
        return self.weights + self.gradients + self.optimizer + self.activations + self.runtime

    def describe(self):
        """"memory per process (fsdp, 2 processes): weights 3.4 GB, gradients ... = 9.8 GB"."""
        parts = ", ".join(f"{name} {getattr(self, name) / GB:.1f} GB"
                          for name in ("weights", "gradients", "optimizer", "activations", "runtime"))
        shape = self.shape
        how = shape.strategy if shape.strategy == "one process" else f"{shape.strategy}, {shape.processes} processes"
        checkpointing = ", activation checkpointing" if shape.activation_checkpointing else ""
        return (f"memory per process ({how}{checkpointing}; micro-batch {shape.micro_batch} x {shape.context} tokens): "
                f"{parts} = {self.total / GB:.1f} GB")


def plan_memory(model, shape):
    """The MemoryPlan of training `model` (a GPTModel, LoRA layers included; on any device, also "meta")."""
    counts = _parameter_counts(model)
    config = model.config
    sharded = shape.strategy == "fsdp"
    shards = shape.processes if sharded else 1
    e = shape.compute_bytes
    if sharded:
        # The shards, plus the units gathered at once in the computation's precision.
        gathered = counts["root"] + 2 * counts["block"]
        weights = 4 * counts["all"] / shards + e * gathered
        gradients = 4 * counts["trained"] / shards + (e + 4) * (counts["trained_root"] + counts["trained_block"])
    else:
        autocast_copies = e * counts["trained_matrices"] if e < 4 else 0
        weights = 4 * counts["all"] + autocast_copies
        gradients = 4 * counts["trained"] * (2 if shape.strategy == "ddp" else 1)
    optimizer = 4 * ADAM_MOMENTS * counts["trained"] / shards
    return MemoryPlan(shape, int(weights), int(gradients), int(optimizer), _activation_bytes(config, shape),
                      RUNTIME_BYTES.get(shape.device_type, RUNTIME_BYTES["cpu"]))


def _activation_bytes(config, shape):
    b, s, e = shape.micro_batch, shape.context, shape.compute_bytes
    h, heads, layers = config["embedding_dim"], config["num_heads"], config["num_layers"]
    # Under FSDP's mixed precision the residual stream is in the computation's precision; under autocast
    # it stays float32.
    residual = e if shape.strategy == "fsdp" else 4
    per_block = b * s * h * (2 * residual + 14 * e)
    if config["drop_rate"] > 0:
        per_block += b * s * h * 8  # the dropouts' masks
        if shape.device_type == "cpu":  # the CPU's fused attention has no dropout: the attention matrices,
            per_block += 3 * 4 * b * heads * s * s  # their mask and the dropped ones, in float32
    outputs = config.get("num_classes") or config["vocab_size"]
    # The logits, their float32 copy and log-softmax for the loss, and the loss's gradient.
    logits = b * s * outputs * (e + 4 + 4 + 4) if e < 4 else b * s * outputs * (4 + 4 + 4)
    if shape.activation_checkpointing:
        return int(layers * b * s * h * residual + per_block + logits)
    return int(layers * per_block + logits)


def _parameter_counts(model):
    block = model.blocks[0]
    trained = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for module in model.modules() if isinstance(module, (nn.Linear, LoRALinear))
                for name, p in module.named_parameters(recurse=False) if p.requires_grad]
    counts = {
        "all": sum(p.numel() for p in model.parameters()),
        "trained": sum(p.numel() for p in trained),
        "block": sum(p.numel() for p in block.parameters()),
        "trained_block": sum(p.numel() for p in block.parameters() if p.requires_grad),
        "trained_matrices": sum(p.numel() for p in matrices),
    }
    blocks = len(model.blocks)
    counts["root"] = counts["all"] - blocks * counts["block"]
    counts["trained_root"] = counts["trained"] - blocks * counts["trained_block"]
    return counts


# ---------------------------------------------------------------- does it fit?
def memory_per_process(device, processes_here=None):
    """Bytes each process may use: a GPU's memory, or the RAM available now shared by the processes on
    this machine (`processes_here`, by default torchrun's LOCAL_WORLD_SIZE)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    processes_here = processes_here or int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return _available_ram() // processes_here


def check_fits(model, shape, available, can_lora=False):
    """Raise a UserError naming the flags that would make the run fit, when its plan exceeds `available`
    bytes per process; returns the plan otherwise."""
    plan = plan_memory(model, shape)
    if plan.total <= available:
        return plan
    fixes = [flags for flags, fixed in _alternatives(model, shape, can_lora) if plan_memory(fixed[0], fixed[1]).total <= available]
    advice = (f"; {fixes[0]} would make it fit" + (f" (or {fixes[1]})" if len(fixes) > 1 else "")) if fixes else \
        "; no flag makes it fit: a smaller model, or devices with more memory"
    raise UserError(f"this run does not fit: {plan.describe()}, but each process has {available / GB:.1f} GB{advice}")


def _alternatives(model, shape, can_lora):
    """(flags, (model, shape)) of the runs that change one thing, the cheapest to accept first."""
    if shape.strategy != "fsdp" and shape.processes > 1:
        yield "--parallel fsdp", (model, replace(shape, strategy="fsdp"))
    if not shape.activation_checkpointing:
        yield "--activation-checkpointing", (model, replace(shape, activation_checkpointing=True))
    if shape.strategy != "fsdp" and shape.processes > 1 and not shape.activation_checkpointing:
        yield "--parallel fsdp --activation-checkpointing", (model, replace(shape, strategy="fsdp",
                                                                              activation_checkpointing=True))
    for micro_batch in _smaller_micro_batches(shape.micro_batch):
        yield f"--micro-batch-size {micro_batch}", (model, replace(shape, micro_batch=micro_batch))
    if can_lora:
        yield "--lora-rank 16", (_with_lora(model), shape)
    for processes in (2, 4, 8, 16, 32, 64):
        if processes > shape.processes:
            yield (f"torchrun --nproc_per_node {processes} ... --parallel fsdp",
                   (model, replace(shape, strategy="fsdp", processes=processes)))


def _smaller_micro_batches(micro_batch):
    """Halvings of `micro_batch` that still divide a process's share as it does, down to 1."""
    while micro_batch % 2 == 0 and micro_batch > 1:
        micro_batch //= 2
        yield micro_batch
    if micro_batch > 1:
        yield 1


def _with_lora(model, rank=16):
    with torch.device("meta"):
        return apply_lora(empty_model(model.config), rank, alpha=rank)


def _available_ram():
    """The memory the machine can give now (free memory and caches it may drop), else all of the RAM."""
    return available_memory() or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

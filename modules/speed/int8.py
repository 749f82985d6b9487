"""int8 weights for generation (--dtype int8): each matrix stored as int8 with one float scale per row.

At batch 1 a generated token reads every weight once, so its time is the weights' bytes over the memory's
bandwidth: a quarter of float32's bytes is up to 4x the tokens a second. Each output row (channel) of a
matrix gets its own scale, max |w| / 127, so that a row of small weights keeps its precision, and zero
stays exactly zero (symmetric). The activations, the scales, the embeddings and the KV cache are in the
activations' dtype (prepare_for_generation: bfloat16 where the machine computes it natively, which halves
what attention reads from the cache: 1.17x the tokens a second of float32 activations with the compiled
step on a 2-core AMD EPYC); the product converts the weights on the fly, which the compiled decoding step
(modules/speed/compiled_generation.py) fuses into the matrix-vector product, as in gpt-fast's
WeightOnlyInt8Linear. Eager, each call converts a whole matrix first: int8 pays only compiled.

Made at load time from any checkpoint: nothing new is saved. The quality it costs is measured in
benchmarks/README.md (next-token agreement with float32, validation loss).
"""
import torch
from torch import nn
from torch.nn import functional as F

QUANTIZE_ROWS = 4096  # rows rounded at once: 12 MiB of float32 temporary at GPT-2's 768 columns


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights and a float scale per output row: y = (x W_int8^T) * scales + bias."""

    def __init__(self, linear):
        super().__init__()
        weight = linear.weight.detach().float()
        # The largest |w| of each row, without a temporary |W| (the head's would be 147 MiB for GPT-2 124M).
        largest = torch.linalg.vector_norm(weight, float("inf"), dim=1)
        scales = largest.clamp(min=torch.finfo(torch.float32).tiny) / 127
        # Rounded a block of rows at a time, so that the float32 temporary stays small.
        self.register_buffer("weight", torch.cat([
            (rows / row_scales[:, None]).round_().clamp_(-127, 127).to(torch.int8)
            for rows, row_scales in zip(weight.split(QUANTIZE_ROWS), scales.split(QUANTIZE_ROWS))]))
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x):
        y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def quantize_int8(model):
    """Replace every nn.Linear of `model` (in float32) by an Int8Linear of its weights, in place; returns it
    in float32 (.to() another dtype converts all but the int8 matrices).

    The head shares its matrix with the token embedding: it gets its own int8 copy, and the embedding,
    of which a token reads one row, keeps its float32 weights."""
    model.float()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                parent.register_module(name, Int8Linear(child))
    return model

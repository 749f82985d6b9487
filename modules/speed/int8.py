"""int8 weights for generation (--dtype int8): each matrix stored as int8 with one float scale per row.

At batch 1 a generated token reads every weight once, so its time is the weights' bytes over the memory's
bandwidth: a quarter of float32's bytes is up to 4x the tokens a second. Each output row (channel) of a
matrix gets its own scale, max |w| / 127, so that a row of small weights keeps its precision, and zero
stays exactly zero (symmetric). The activations, the scales, the embeddings and the KV cache are in the
activations' dtype (prepare_for_generation: bfloat16 where the machine computes it natively, which halves
what attention reads from the cache: 1.17x the tokens a second of float32 activations with the compiled
step on a 2-core AMD EPYC); the compiled decoding step (modules/speed/compiled_generation.py) converts
the weights on the fly inside a single row's product, one pass over the int8 matrix, as gpt-fast's
WeightOnlyInt8Linear does (on AVX2 CPUs over int8 packed four to a word: Int8WordsLinear). Eager, each
call converts a whole matrix first: int8 pays only compiled.

Made at load time from any checkpoint: nothing new is saved. The quality it costs is measured in
benchmarks/README.md (next-token agreement with float32, validation loss).
"""
import sys

import torch
from torch import nn
from torch.nn import functional as F

QUANTIZE_ROWS = 4096  # rows rounded at once: 12 MiB of float32 temporary at GPT-2's 768 columns
# The left shifts that bring byte j of a 32-bit word (in memory order) to its top 8 bits.
BYTE_SHIFTS = (24, 16, 8, 0) if sys.byteorder == "little" else (0, 8, 16, 24)


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights and a float scale per output row: y = (x W_int8^T) * scales + bias.

    Compiled, a single row's product is one loop over the int8 matrix that converts each weight as it
    reads it (row_product); eager, F.linear takes the whole matrix converted first."""

    def __init__(self, linear):
        super().__init__()
        weight = linear.weight.detach().float()
        self.in_features = weight.shape[1]
        # The largest |w| of each row, without a temporary |W| (the head's would be 147 MiB for GPT-2 124M).
        largest = torch.linalg.vector_norm(weight, float("inf"), dim=1)
        scales = largest.clamp(min=torch.finfo(torch.float32).tiny) / 127
        # Rounded (and laid out: pack) a block of rows at a time, so that the float32 temporary stays small.
        self.register_buffer("weight", torch.cat([
            self.pack((rows / row_scales[:, None]).round_().clamp_(-127, 127).to(torch.int8))
            for rows, row_scales in zip(weight.split(QUANTIZE_ROWS), scales.split(QUANTIZE_ROWS))]))
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def pack(self, rows):
        """The int8 rows, (rows, in), as this class stores them: as they are."""
        return rows

    def matrix(self, dtype=torch.int8):
        """The matrix, (out, in), its int8 weights in `dtype`."""
        return self.weight.to(dtype)

    def product(self, x):
        """x W_int8^T, in x's dtype."""
        if x.shape[:-1].numel() == 1 and torch.compiler.is_compiling():
            return self.row_product(x).to(x.dtype)
        # Eager, the row product's temporary, as large as the matrix, costs more than converting it.
        return F.linear(x, self.matrix(x.dtype))

    def row_product(self, x):
        """x W_int8^T for a single row x (..., in), in float32, written out as sum_k x_k W_nk: compiled, one
        pass over the matrix. In float32, not in x's bfloat16: there inductor's AVX-512 loop takes 32 weights
        at a time, loading 32 int8 with a masked load, and in float32 16, a plain load of a quarter vector;
        on a 2-core AMD EPYC with AVX512-BF16 the head's 50257 x 768 product took 3.8 ms in bfloat16, 1.1
        ms in float32, and the int8 step ran 67 against 202 tokens/s (benchmarks/README.md)."""
        return (x.float()[..., None, :] * self.weight.float()).sum(-1)

    def forward(self, x):
        y = self.product(x) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int8WordsLinear(Int8Linear):
    """Int8Linear for CPUs whose compiled code loads int8 slowly (AVX2 without AVX-512, words_pay).

    Inductor's AVX2 code loads a vector of any integer type through a temporary buffer, at a fifth of a
    float vector's speed, so here the int8 matrix is stored as four weights to a 32-bit word, (out, in/4
    words, 4 bytes), the columns rounded up to a multiple of 4 with zeros: byte j of word m holds column
    j * in/4 + m, so that a single row's product is one pass over the words, read as float32 (a full-width
    load) and reinterpreted, sum_m sum_j x[j * in/4 + m] byte_j(word m), each byte taken out of its word
    by two shifts (row_product). On a 2-core AMD EPYC with AVX2 a 50257 x 768 int8 product took 2.3-2.8 ms
    this way, 6-7 ms in float32, 28 ms read as int8 columns. On AVX-512, where int8 loads are plain
    loads, the columns stay: the int8 step ran 194 tokens/s over them, 184 over the words (2-core AMD EPYC
    with AVX512-BF16, one process, alternating; benchmarks/README.md)."""

    def pack(self, rows):
        """int8 rows, (rows, in), four to a word, (rows, words, 4): byte j of word m is column j * words + m,
        the columns from in to 4 * words zero."""
        words = -(-self.in_features // 4)
        return F.pad(rows, (0, 4 * words - rows.shape[1])).unflatten(1, (4, words)).transpose(1, 2).contiguous()

    def matrix(self, dtype=torch.int8):
        """The matrix, (out, in), its int8 weights in `dtype` (converted as they are unpacked: one copy)."""
        out_features, words, _ = self.weight.shape
        matrix = torch.empty(out_features, 4, words, dtype=dtype, device=self.weight.device)
        matrix.copy_(self.weight.transpose(1, 2))
        return matrix.view(out_features, 4 * words)[:, :self.in_features]

    def row_product(self, x):
        """x W_int8^T for a single row x (..., in), in float32 (see Int8Linear.row_product), over the words:
        the products of x's four segments with the four bytes of each word, summed (compiled, one pass)."""
        words = self.weight.view(torch.float32).view(torch.int32).squeeze(-1)  # (out, in/4); float32: above
        x = F.pad(x.float(), (0, 4 * words.shape[1] - self.in_features))
        x = x.view(*x.shape[:-1], 4, words.shape[1])
        products = sum(x[..., j, None, :] * ((words << shift) >> 24).float()  # the byte, sign-extended
                       for j, shift in enumerate(BYTE_SHIFTS))
        return products.sum(-1)


def words_pay(device):
    """Whether Int8WordsLinear is the faster layout on `device`: on a CPU that inductor compiles for with
    AVX2 but not AVX-512 (torch.backends.cpu.get_cpu_capability, which ATEN_CPU_CAPABILITY can lower)."""
    return torch.device(device).type == "cpu" and torch.backends.cpu.get_cpu_capability() == "AVX2"


def quantize_int8(model):
    """Replace every nn.Linear of `model` (in float32) by an Int8Linear of its weights (an Int8WordsLinear
    where words_pay), in place; returns it in float32 (.to() another dtype converts all but the int8
    matrices).

    The head shares its matrix with the token embedding: it gets its own int8 copy, and the embedding,
    of which a token reads one row, keeps its float32 weights."""
    model.float()
    layer = Int8WordsLinear if words_pay(model.token_embedding.weight.device) else Int8Linear
    # The places, not the Linears: each float32 matrix is freed as soon as its Int8Linear replaces it.
    places = [(parent, name) for parent in model.modules()
              for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name in places:
        parent.register_module(name, layer(getattr(parent, name)))
    return model

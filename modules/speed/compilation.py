"""torch.compile in training, as the flags say: the next-token cross-entropy (--compile-loss, on by default
where it was measured faster) and the whole model (--compile, off by default).

The loss of a language model is a softmax over the whole vocabulary at every position: for GPT-2's 50,257
tokens at 4 x 256 positions, 51 million exponentials forward and again backward, over logits too large
for any cache. PyTorch runs it as separate passes over memory (convert to float32, log-softmax, gather,
and backward: zeros, scatter, log-softmax's gradient); torch.compile fuses them. On a 2-core Intel Xeon
(AMX) the loss of 2,048 x 50,257 bfloat16 logits took 505 ms forward and backward, 155 ms compiled, and a
step of train.py's model (4 layers, 256 wide, batch 4 x 256) 261 ms against 207; it saved 68% of the
loss's time on a 2-core AMD EPYC. Compiling costs time once (about 30 s on 2 cores with empty caches, a
few seconds once TorchInductor's cache, .cache/torch-compile, holds it) and needs a C++ compiler on the CPU: --no-compile-loss
for a short run or a machine without one.

Compiling the whole model fuses its element-wise work (GELU, dropout, residual additions) into the matrix
products around it. On a GPU that is where much of a step goes (nanoGPT's README: 250 to 135 ms an
iteration); on the CPU the step is its matrix products, and compiled it ran no faster (2 cores of an
Intel Xeon: 2,514 against 2,523 tokens/s, `python -m benchmarks.bench_training --size tiny [--compile]`).
So it is left to the user: --compile, for the GPU.
"""
import torch

from ..caches import use_compile_cache

# --compile-loss's default on each kind of device, and why.
LOSS_COMPILED_BY_DEFAULT = {
    "cpu": (True, "a step of train.py's model 0.21 s against 0.26 s eager on a 2-core Intel Xeon"),
    "cuda": (True, "not measured on a GPU here; the same passes over memory are fused"),
    "mps": (False, "torch.compile's support for mps is a prototype"),
}


def loss_compilation(flag, device):
    """(whether the loss is compiled, the line saying so and why) for --compile-loss `flag` (None: the
    device's default)."""
    default, reason = LOSS_COMPILED_BY_DEFAULT.get(torch.device(device).type, (False, "not measured there"))
    compiled = default if flag is None else flag
    if compiled and use_compile_cache() is None:  # inductor writes what it builds: nowhere, nothing compiles
        return False, "loss: eager (no folder for compiled programs can be written)"
    how = f"the default on {torch.device(device).type}: {reason}" if flag is None else "as asked"
    return compiled, f"loss: {'compiled' if compiled else 'eager'} ({how}; --{'no-' if compiled else ''}compile-loss for the other)"


def compiled_model(model):
    """`model` under torch.compile (train.py --compile): the same parameters, a compiled forward pass."""
    return torch.compile(model)

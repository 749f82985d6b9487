"""Speed machinery: what makes the model faster without being part of GPT-2's maths.

The model's files (attention, layer_norm, feed_forward, transformer, model) compute GPT-2 and nothing
else. Each piece here is applied explicitly by the code that wants it, says what it gains and where that
was measured, and is taken on a machine only where it is faster there:

- kernels: for generation on the CPU, the faster of two linear kernels, measured at first use
  (the generation entry points);
- memory: glibc keeps freed memory for reuse (the training loop, on the CPU);
- precision: bfloat16 where the machine computes it natively (--dtype auto: training and generation);
- compilation: torch.compile's fusion of the training loss, where measured faster, and of the whole model
  with --compile (the training loop).
"""
from .compilation import compiled_model, fastest_loss
from .kernels import use_fastest_linear_kernels
from .memory import keep_freed_memory
from .precision import auto_dtype, describe_precision, resolve_dtype


GENERATION_DTYPES = ("auto", "float32", "bfloat16")


def add_generation_dtype_arg(parser):
    """The --dtype flag of the scripts that generate; its value goes to prepare_for_generation."""
    parser.add_argument("--dtype", choices=GENERATION_DTYPES, default="auto",
                        help="precision of the weights while generating: auto is bfloat16 where the GPU or CPU "
                             "computes it natively (AMX, AVX512-BF16), else float32 (default: %(default)s)")


def prepare_for_generation(model, dtype_name="auto"):
    """The model as the generating code paths run it (the app, evaluate_responses.py, get_gpt_weights.py's
    sample, the benchmarks): its weights in the dtype --dtype `dtype_name` stands for (auto: bfloat16 where
    the machine computes it natively, which halves the bytes each generated token reads) and the linear
    kernels measured fastest. Changes `model` in place and returns it."""
    dtype = resolve_dtype(dtype_name, model.token_embedding.weight.device)
    return use_fastest_linear_kernels(model.to(dtype))


__all__ = ["GENERATION_DTYPES", "add_generation_dtype_arg", "auto_dtype", "compiled_model", "describe_precision",
           "fastest_loss", "keep_freed_memory", "prepare_for_generation", "resolve_dtype", "use_fastest_linear_kernels"]

"""Speed machinery: what makes the model faster without being part of GPT-2's maths.

The model's files (attention, layer_norm, feed_forward, transformer, model) compute GPT-2 and nothing
else. Each piece here is applied explicitly by the code that wants it, says what it gains and where that
was measured, and is taken on a machine only where it is faster there:

- compiled_generation: generation's fast path, CompiledDecoder: a static KV cache and the decoding step
  compiled whole (the generating scripts with --compile pass it: generate(..., decoder=CompiledDecoder(model)));
- int8: int8 weights with a scale per row, made at load time (--dtype int8);
- memory: glibc keeps freed memory for reuse (the training loop, on the CPU);
- precision: bfloat16 where the machine computes it natively (--dtype auto: training and generation);
- compilation: torch.compile's fusion of the training loss, where measured faster, and of the whole model
  with --compile (the training loop).
"""
import argparse

from .compilation import compiled_model, fastest_loss
from .compiled_generation import COMPILE_CACHE, CompiledDecoder
from .int8 import Int8Linear, quantize_int8
from .memory import keep_freed_memory
from .precision import auto_dtype, describe_precision, resolve_dtype


GENERATION_DTYPES = ("auto", "float32", "bfloat16", "int8")


def add_generation_args(parser, compile_by_default=False):
    """The --dtype and --compile/--no-compile flags of the scripts that generate (prepare_for_generation and
    decoder_for); compiling is the default of those that generate long enough to gain from it (the app)."""
    parser.add_argument("--dtype", choices=GENERATION_DTYPES, default="auto",
                        help="precision of the weights while generating: auto is bfloat16 where the GPU or CPU "
                             "computes it natively (AMX, AVX512-BF16), else float32; int8: int8 matrices with a "
                             "scale per row, made at load time, the rest as auto (default: %(default)s)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=compile_by_default,
                        help="compile the decoding step over a static KV cache (half a minute for GPT-2 124M the "
                             f"first time; later processes find it in {COMPILE_CACHE}); on 2-core AMD EPYCs it "
                             "generated one sequence 2x to 3x as fast as the eager step (benchmarks/README.md; "
                             "default: %(default)s)")


def prepare_for_generation(model, dtype_name="auto"):
    """The model as the generating code paths run it (the app, evaluate_responses.py, get_gpt_weights.py's
    sample, the benchmarks): its weights in the dtype --dtype `dtype_name` stands for (auto: bfloat16 where
    the machine computes it natively, which halves the bytes each generated token reads; int8: a quarter
    of float32's, modules/speed/int8.py, computing in what auto stands for). Changes `model` in place and
    returns it."""
    device = model.token_embedding.weight.device
    if dtype_name == "int8":
        quantize_int8(model).to(resolve_dtype("auto", device))
    else:
        model.to(resolve_dtype(dtype_name, device))
    return model


def decoder_for(model, compiled):
    """What --compile/--no-compile stands for, as generate's `decoder`: a CompiledDecoder of `model`, or
    None, the eager path."""
    return CompiledDecoder(model) if compiled else None


def generation_dtype(model):
    """The --dtype a prepared model runs in, as a name: "int8", or its weights' dtype."""
    if any(isinstance(module, Int8Linear) for module in model.modules()):
        return "int8"
    return str(model.token_embedding.weight.dtype).removeprefix("torch.")


__all__ = ["COMPILE_CACHE", "CompiledDecoder", "GENERATION_DTYPES", "add_generation_args", "auto_dtype",
           "compiled_model", "decoder_for", "describe_precision", "fastest_loss", "generation_dtype",
           "keep_freed_memory", "prepare_for_generation", "quantize_int8", "resolve_dtype"]

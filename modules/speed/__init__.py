"""Speed machinery: what makes the model faster without being part of GPT-2's maths.

The model's files (attention, layer_norm, feed_forward, transformer, model) compute GPT-2 and nothing
else. Each piece here is applied explicitly by the code that wants it, says what it gains and where that
was measured, and is taken on a machine only where it is faster there:

- compiled_generation: generation's fast path, CompiledDecoder: a static KV cache and the decoding step
  compiled whole (the generating scripts with --compile pass it: generate(..., decoder=CompiledDecoder(model)));
- int8: int8 weights with a scale per row, made at load time (--dtype int8);
- memory: glibc keeps freed memory for reuse (the training loop, on the CPU);
- precision: bfloat16 where the machine computes it natively (--dtype auto: training and generation);
- compilation: torch.compile of the training loss (--compile-loss) and of the whole model (--compile).

Each piece is imported where it is used (`from modules.speed.precision import ...`), so training imports
no generation code and generation no training code; the names below are loaded on first use.
"""
import argparse
import importlib

# name -> the submodule that defines it, imported on first use (PEP 562)
_LAZY = {"COMPILE_CACHE": "compiled_generation", "CompiledDecoder": "compiled_generation",
         "compiled_model": "compilation", "Int8Linear": "int8", "quantize_int8": "int8",
         "keep_freed_memory": "memory", "auto_dtype": "precision", "describe_precision": "precision",
         "resolve_dtype": "precision"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
                             "first time; later processes find it in .cache/torch-compile/); on 2-core AMD EPYCs "
                             "it generated one sequence 2x to 3x as fast as the eager step (benchmarks/README.md; "
                             "default: %(default)s)")


def prepare_for_generation(model, dtype_name="auto"):
    """The model as the generating code paths run it (the app, evaluate_responses.py, get_gpt_weights.py's
    sample, the benchmarks): its weights in the dtype --dtype `dtype_name` stands for (auto: bfloat16 where
    the machine computes it natively, which halves the bytes each generated token reads; int8: a quarter
    of float32's, modules/speed/int8.py, computing in what auto stands for). Changes `model` in place and
    returns it."""
    from .int8 import quantize_int8
    from .precision import resolve_dtype

    device = model.token_embedding.weight.device
    if dtype_name == "int8":
        quantize_int8(model).to(resolve_dtype("auto", device))
    else:
        model.to(resolve_dtype(dtype_name, device))
    return model


def decoder_for(model, compiled):
    """What --compile/--no-compile stands for, as generate's `decoder`: a CompiledDecoder of `model`, or
    None, the eager path."""
    from .compiled_generation import CompiledDecoder

    return CompiledDecoder(model) if compiled else None


def generation_dtype(model):
    """The --dtype a prepared model runs in, as a name: "int8", or its weights' dtype."""
    from .int8 import Int8Linear

    if any(isinstance(module, Int8Linear) for module in model.modules()):
        return "int8"
    return str(model.token_embedding.weight.dtype).removeprefix("torch.")


__all__ = ["GENERATION_DTYPES", "add_generation_args", "decoder_for", "generation_dtype", "prepare_for_generation",
           *_LAZY]

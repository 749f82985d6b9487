"""Speed machinery: what makes the model faster without being part of GPT-2's maths.

The model's files (attention, layer_norm, feed_forward, transformer, model) compute GPT-2 and nothing
else. Each piece here is applied explicitly by the code that wants it, says what it gains and where that
was measured, and is taken on a machine only where it is faster there:

- construction: build a model around existing weights (checkpoints, OpenAI's files) without drawing
  random ones first (checkpoint and weight loading);
- kernels: for generation on the CPU, the faster of two linear kernels, measured at first use
  (the generation entry points);
- memory: glibc keeps freed memory for reuse (the training loop, on the CPU);
- precision: bfloat16 where the machine computes it natively (--dtype auto: training and generation).
"""
from .construction import empty_model, model_from_state_dict
from .kernels import use_fastest_linear_kernels
from .memory import keep_freed_memory
from .precision import auto_dtype, describe_precision, resolve_dtype


def prepare_for_generation(model, dtype_name="auto"):
    """The model as the generating code paths run it (the app, evaluate_responses.py, get_gpt_weights.py's
    sample, the benchmarks): its weights in the dtype --dtype `dtype_name` stands for (auto: bfloat16 where
    the machine computes it natively, which halves the bytes each generated token reads) and the linear
    kernels measured fastest. Changes `model` in place and returns it."""
    dtype = resolve_dtype(dtype_name, model.token_embedding.weight.device)
    return use_fastest_linear_kernels(model.to(dtype))


__all__ = ["auto_dtype", "describe_precision", "empty_model", "keep_freed_memory", "model_from_state_dict",
           "prepare_for_generation", "resolve_dtype", "use_fastest_linear_kernels"]

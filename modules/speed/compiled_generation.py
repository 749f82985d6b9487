"""The fast path of generation, after gpt-fast: a static KV cache and the one-token step compiled whole.

    decoder = CompiledDecoder(model)                 # one per model; compiles on first use
    generate(model, input_ids, 100, decoder=decoder)  # the eager path's tokens, sooner

At batch 1 a generated token reads every weight once, and the eager step spends much of its time around
those reads: a Python call, a dispatch and a temporary tensor for each of the ~20 small operations of a
layer. A StaticKVCache gives every step the same shapes, so torch.compile(fullgraph=True, dynamic=False)
turns the step into one graph and inductor into one program, the element-wise work fused between the
matrix products (on CUDA, mode="reduce-overhead" replays it as one CUDA graph). On the CPU three choices
make that program fast (cpu_decode_step, CPU_OPTIONS):

- one row's product with a weight matrix is written out, y_n = sum_k x_k W_nk (DecodingProducts): one
  loop that streams the matrix through every core, where F.linear's BLAS call ran one row on one core;
- attention is written out (the "math" backend): the fused kernel is made for many queries, not one;
- realize_acc_reads_threshold=1: layer norm's output goes to a buffer once, not recomputed for each of the
  2,304 outputs of the product that reads it (which halved the speed).

Dynamo checks every guard before each call, so a model that changed since a program was built (its dtype,
int8 or LoRA layers) runs a program of its own, never another's, whichever thread calls. The guards cost
0.15 to 0.2 ms a call for GPT-2 124M's modules, 1% to 5% of a token (benchmarks/README.md, "The guards"):
too little to give up that safety for. Compiling GPT-2 124M takes 20 to 30 s on 2 cores; inductor keeps
the program in COMPILE_CACHE, where a later process finds it (3 to 6 s). Where compiling fails (no C++
compiler, or Dynamo's limit of 8 programs of one function in a process), the eager step runs over the
same cache, with one printed line.
"""
import os
import sys
import threading
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from ..caches import use_compile_cache
from ..errors import UserError
from ..inference import activation_device_and_dtype, attention_mask_for, token_positions

# Where inductor keeps the programs it builds: the project's .cache/torch-compile, or where it can write
# (modules/caches.py). Chosen on import: inductor fixes its folder the first time anything asks.
COMPILE_CACHE = use_compile_cache()
SLOT_BUCKETS = (128, 256, 384, 512, 768, 1024)
CPU_OPTIONS = {"realize_acc_reads_threshold": 1}


class CompiledDecoder:
    """The compiled decoding step of one model, one program per (model program, batch size, cache slots).

    generate(..., decoder=this) calls start() once per generation. A shape met for the first time is
    compiled right there, unless a background build (compile_in_background, the app's) is making it: then
    the eager step answers meanwhile, over the same static cache."""

    def __init__(self, model):
        self.model = model
        if model.token_embedding.weight.device.type == "cuda":
            self.compiled = torch.compile(decode_step, fullgraph=True, dynamic=False, mode="reduce-overhead")
        else:
            self.compiled = torch.compile(cpu_decode_step, fullgraph=True, dynamic=False, options=CPU_OPTIONS)
        self.ready, self.building, self.failed = set(), set(), None  # of (program, batch size, slots)
        self.lock = threading.Lock()  # one build at a time

    def start(self, model, batch_size, tokens):
        """A StaticDecoding for one generation of `batch_size` sequences of up to `tokens` positions."""
        if model is not self.model:
            raise UserError("this CompiledDecoder was made for another model: make one for each model, "
                            "CompiledDecoder(model)")
        program = program_of(model)
        slots = self.ready_slots(batch_size, tokens, program) or cache_slots(tokens, model.config["context_size"])
        return StaticDecoding(self, StaticKVCache(model, batch_size, slots), program)

    def step(self, kv_cache, token, slot, program):
        """decode_step(model, kv_cache, token, slot), compiled where it can be."""
        key = (program, *kv_cache.filled.shape)
        if key not in self.ready:
            if self.failed or key in self.building or not self.build(kv_cache, token, slot, key):
                return decode_step(self.model, kv_cache, token, slot)
        return self.compiled(self.model, kv_cache, token, slot)

    def ready_slots(self, batch_size, tokens, program=None):
        """The fewest cache slots, at least those `tokens` positions need, for which the step of `batch_size`
        sequences of the model as it is now is compiled, or None. A prompt shorter than the one compiled
        for uses its program: attending over more empty slots costs less than compiling again."""
        program = program or program_of(self.model)
        needed = cache_slots(tokens, self.model.config["context_size"])
        ready = tuple(self.ready)  # copied at once (in C): a build in another thread may add to it meanwhile
        return min((slots for built, batch, slots in ready
                    if built == program and batch == batch_size and slots >= needed), default=None)

    def ready_or_build_in_background(self, batch_size, tokens):
        """Whether a step for `batch_size` sequences of up to `tokens` positions is compiled; when not, its
        build starts in the background (unless one is under way or compiling failed here)."""
        if self.ready_slots(batch_size, tokens) is not None:
            return True
        if not self.building and not self.failed:
            self.compile_in_background(batch_size, tokens)
        return False

    def build(self, kv_cache, token, slot, key):
        """Compile for `key` (program, batch, slots), running the step once on these inputs; whether it worked."""
        with self.lock:
            if key in self.ready:
                return True
            if self.failed:
                return False
            self.building.add(key)
            cached_before, start = cached_files(), time.perf_counter()
            try:
                self.compiled(self.model, kv_cache, token, slot)
            except Exception as error:  # torch.compile raises many kinds of errors where it cannot run here
                self.failed = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
                report(f"The decoding step could not be compiled here ({self.failed[:200]}): generating with the "
                       "eager step.")
                return False
            finally:
                self.building.discard(key)
            self.ready.add(key)
            seconds, compiled = time.perf_counter() - start, cached_files() - cached_before
        from . import generation_dtype

        what = f"the decoding step for batch {key[1]}, {key[2]} cache slots, {generation_dtype(self.model)}"
        report(f"Compiled {what} in {seconds:.1f} s (kept in {cache_folder()})." if compiled else
               f"Loaded {what} from the on-disk cache ({cache_folder()}) in {seconds:.1f} s.")
        return True

    def compile_in_background(self, batch_size, tokens):
        """Build the step for `batch_size` sequences of up to `tokens` positions in a daemon thread (the app
        serves with the eager step meanwhile)."""
        program = program_of(self.model)
        key = (program, batch_size, cache_slots(tokens, self.model.config["context_size"]))

        def build():
            try:
                with torch.inference_mode():
                    cache = StaticKVCache(self.model, batch_size, key[2])
                    token = torch.zeros(batch_size, 1, dtype=torch.long, device=cache.filled.device)
                    self.build(cache, token, torch.zeros(1, dtype=torch.long, device=cache.filled.device), key)
            finally:  # also when the cache could not be made: a later request may try again
                self.building.discard(key)

        self.building.add(key)
        threading.Thread(target=build, daemon=True, name="compile-decoding-step").start()


def program_of(model):
    """What a compiled step depends on besides the cache's shape: every module's class and mode (train or
    eval) and every weight's dtype, shape and device, hashed. model.to(torch.bfloat16), quantize_int8 or
    apply_lora change it, so the decoder builds (or finds on disk) a program for the model as it is now
    rather than believing itself ready; Dynamo's guards would catch the change at the call anyway."""
    modules = tuple((name, type(module), module.training) for name, module in model.named_modules())
    tensors = tuple((name, tensor.dtype, tensor.shape, tensor.device)
                    for name, tensor in model.state_dict(keep_vars=True).items())
    return hash((modules, tensors))


class StaticDecoding:
    """One generation on the fast path: its StaticKVCache; the prompt runs eagerly (its length differs
    from one generation to the next), every later token through the decoder's compiled step."""

    def __init__(self, decoder, kv_cache, program):
        self.decoder, self.kv_cache, self.program = decoder, kv_cache, program

    def next_token_logits(self, tokens, attention_mask=None):
        """(batch, vocab) logits of the token after `tokens` (batch, tokens so far), as EagerDecoding's."""
        kv_cache, model = self.kv_cache, self.decoder.model
        if kv_cache.length == 0:
            positions, mask = kv_cache.prefill_inputs(attention_mask, tokens.shape[1])
            logits = model(tokens, positions, mask, kv_cache, last_only=True)[:, -1]
        else:
            if tokens.shape[1] != kv_cache.length + 1:
                raise ValueError("a StaticKVCache takes one new token a step")
            slot = torch.full((1,), kv_cache.length, device=tokens.device)
            # A copy with the strides of a fresh (batch, 1) tensor: a compiled step is specialised on strides.
            token = tokens[:, -1:].clone(memory_format=torch.contiguous_format)
            logits = self.decoder.step(kv_cache, token, slot, self.program)
        kv_cache.length = tokens.shape[1]
        return logits

    def clear(self):
        self.kv_cache.clear()


class StaticKVCache:
    """Every layer's keys and values in a fixed number of slots, and which slots hold a real token.

    Slot i holds column i of the left-padded batch. A step writes its keys and values into one slot and
    attends over every slot, a boolean mask keeping out the slots not written yet and the padding. The
    model's layers call update(keys, values) as with the eager KVCache; the slots the new tokens go to are
    set before the forward pass (`write_slots`)."""

    def __init__(self, model, batch_size, slots):
        config = model.config
        device, dtype = activation_device_and_dtype(model)
        shape = (batch_size, config["num_heads"], slots, config["embedding_dim"] // config["num_heads"])
        self.layers = [StaticLayerKVCache(self, shape, device, dtype) for _ in range(config["num_layers"])]
        self.filled = torch.zeros(batch_size, slots, dtype=torch.bool, device=device)  # False: padding or empty
        self.slot_ids = torch.arange(slots, device=device)
        self.write_slots = self.slot_ids[:0]
        self.length = 0  # slots written so far

    def clear(self):
        self.filled.fill_(False)
        self.length = 0

    def prefill_inputs(self, attention_mask, tokens):
        """(positions, mask) of a prompt of `tokens` columns written into slots 0..tokens-1."""
        self.filled[:, :tokens] = True if attention_mask is None else attention_mask
        self.write_slots = self.slot_ids[:tokens]
        device = self.filled.device
        return (token_positions(self.filled[:, :tokens], 0, tokens, device),
                attention_mask_for(self.filled, 0, tokens, device))

    def step_inputs(self, slot):
        """(positions, mask) of one new real token per sequence written into `slot`, a (1,) tensor."""
        self.filled.index_fill_(1, slot, True)
        self.write_slots = slot
        positions = self.filled.sum(-1, keepdim=True) - 1  # (batch, 1): how many real tokens came before
        mask = (self.slot_ids <= slot) & self.filled  # (batch, slots)
        return positions, mask[:, None, None, :]


class StaticLayerKVCache:
    """One layer's keys and values, (batch, heads, slots, head_dim) each, zeros until written: a masked
    slot's weight is exactly 0, and 0 times an uninitialised NaN would still be NaN."""

    def __init__(self, cache, shape, device, dtype):
        self.cache = cache
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, keys, values):
        """Write the new tokens' keys and values into their slots; return every slot's."""
        self.keys.index_copy_(2, self.cache.write_slots, keys)
        self.values.index_copy_(2, self.cache.write_slots, values)
        return self.keys, self.values


def cache_slots(tokens, context_size):
    """The slots of a StaticKVCache for `tokens` positions: the smallest bucket that holds them, at most the
    context (past it, the window slides and is recomputed). Attending over empty slots costs time, so a
    short chat gets a short cache, and a few sizes keep the programs to compile few."""
    return min([bucket for bucket in SLOT_BUCKETS if bucket >= tokens] + [context_size])


def decode_step(model, kv_cache, token, slot):
    """(batch, vocab) logits after one new token per sequence, (batch, 1), written into `slot` of a
    StaticKVCache: the same shapes at every step, the function CompiledDecoder compiles."""
    positions, mask = kv_cache.step_inputs(slot)
    return model(token, positions, mask, kv_cache)[:, -1]


def cpu_decode_step(model, kv_cache, token, slot):
    """decode_step as the CPU compiles it: attention written out, the products as DecodingProducts has them."""
    with sdpa_kernel([SDPBackend.MATH]), DecodingProducts():
        return decode_step(model, kv_cache, token, slot)


class DecodingProducts(TorchFunctionMode):
    """While active, F.linear computes x W^T + b as the compiled CPU step runs it fastest, every other call
    unchanged. A single row x (one sequence's one token): the broadcast product x_k W_nk summed over k,
    which inductor compiles into one pass over W (eager, it would be a temporary as large as W: only for
    compiling). Several float32 rows: (W x^T)^T, for MKL's product of a tall matrix with a few columns ran
    1.2x to 3.5x as fast as that of a few rows with a transposed matrix (batches of 2 to 32, GPT-2 124M's
    matrices, 2-core AMD EPYC); bfloat16's (oneDNN's) was faster as it is."""

    def __torch_function__(self, function, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if function is F.linear:
            x, weight, bias = (*args, *kwargs.values(), None)[:3]  # nn.Linear passes all three in order
            if x.shape[:-1].numel() == 1:
                y = (x[..., None, :] * weight).sum(-1)  # (..., 1, in) * (out, in) -> (..., out)
            elif x.dtype == torch.float32:
                rows = x.reshape(-1, x.shape[-1])
                y = torch.mm(weight, rows.t()).t().reshape(*x.shape[:-1], -1)  # (out, in) (in, rows) -> (rows, out)
            else:
                return function(*args, **kwargs)
            return y if bias is None else y + bias
        return function(*args, **kwargs)


def report(line):
    print(line, file=sys.stderr, flush=True)


def cache_folder():
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", COMPILE_CACHE))


def cached_files():
    """The files in inductor's cache: a compilation adds some, finding it all on disk adds none."""
    return {path for path in cache_folder().rglob("*") if path.is_file()} if COMPILE_CACHE else set()

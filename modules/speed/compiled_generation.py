"""Generation's decoding step compiled whole, as gpt-fast does it: one program per batch size and cache length.

At batch 1 a generated token reads every weight once, and the eager step spends much of its time not in
those reads but around them: a Python call, a dispatch and a temporary tensor for each of the ~20 small
operations of every layer. With a StaticKVCache every step has the same shapes, so
torch.compile(fullgraph=True, dynamic=False) turns the whole step into one graph and inductor into one
program, the element-wise work (and attention's softmax) fused between the matrix products. On CUDA,
mode="reduce-overhead" replays the step as one CUDA graph.

On the CPU three things make the compiled step fast; without them it was slower than the eager step
(measured on a 2-core AMD EPYC with AVX512-BF16, GPT-2 124M, batch 1, 64+256 tokens):

- A single row's product with a weight matrix is written out as what it is, y_n = sum_k x_k W_nk
  (DecodingProducts), so that inductor makes one loop streaming the matrix through both cores.
  F.linear would call the BLAS matrix product instead, which for one row ran on one core. An int8
  matrix's product is written out by Int8Linear itself, its conversion to float inside the loop.
- Attention is compiled written out (softmax(Q K^T) V, PyTorch's "math" backend): the fused kernel is made
  for many queries, and for one query over 512 cached bfloat16 keys and values it took 4.9 ms a token for
  12 layers, inductor's loops 0.65.
- Inductor computes an element-wise result that feeds a reduction into a buffer of its own
  (realize_acc_reads_threshold 1). By default it recomputes it inside the reduction: layer norm's output
  once for every one of the 2,304 outputs of the product that follows, which halved the speed.

With these the compiled step ran at 1.6x the eager one in float32 (62 against 38 tokens/s) and 2x in
bfloat16 (118 against 60), 125-130 tokens/s with int8 weights. At batch 2 and more the rows of a product
share each weight they read, and a BLAS matrix product stays: bfloat16's as F.linear calls it, float32's
as W x^T, which MKL ran faster (DecodingProducts; batch 8, 64+256 tokens, against the eager step of before
December 2026, whose oneDNN kernels are gone: 0.84x and 0.90x as F.linear, 0.94x and 0.97x as W x^T).

Dynamo checks before each call that nothing it compiled against has changed ("guards"). On the model's
modules these checks took 0.66 ms of a 7 ms token. GPT-2's blocks are alike, so only the first block's
are kept (first_block_guards), and once the step of a shape is built under them, its later calls check
only the guards that tell apart the programs compiled so far (torch.compiler.set_stance's
skip_guard_eval_unsafe: nothing but the shape changes between calls of one CompiledDecoding, and a new
shape is built under every guard first). Inductor's own check of the sizes and strides of each of the
~225 inputs at every call goes too ("size_asserts"): the guards checked them when the shape was built.
Together with the 384-slot bucket (instead of 512 for 64+256 tokens) these made the int8 step 1.07x to
1.09x as fast (2-core AMD EPYC, in one process, alternating).

Compiling GPT-2 124M took 20 to 30 s on 2 cores; inductor keeps what it built in COMPILE_CACHE
(git-ignored), keyed by the graph, the torch version and the CPU's instructions, so a second process with
the same model shape and dtype compiles nothing and runs the program of the first (loaded in 3 to 6 s):
nothing is chosen by timing, so the same command gives the same tokens in every later process, however
busy the machine (the prompt's eager forward pass runs PyTorch's own kernels too).
Where compiling is impossible (no C++ compiler, say), the eager step runs instead, with one printed line.
"""
import os
import re
import sys
import threading
import time
import weakref
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from ..inference import StaticKVCache, cache_slots, decode_step

COMPILE_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "torch-compile"
_decodings = weakref.WeakKeyDictionary()  # model -> its CompiledDecoding


_decodings_lock = threading.Lock()  # two sessions of the app asking at once share one
# Dynamo's stance is the process's, not a thread's: while a step skips guards (CompiledDecoding.step), the
# first call of a build in another thread (the app's background one) would skip them too, and could run the
# program of another shape. A build holds this lock; a step skips guards only when it gets it at once.
_compiling = threading.Lock()


def compiled_decoding(model):
    """The CompiledDecoding of `model`, made on first use: what it compiled is kept while the model lives."""
    with _decodings_lock:
        if model not in _decodings:
            _decodings[model] = CompiledDecoding(model)
        return _decodings[model]


def compiled_decoding_if_any(model):
    """The CompiledDecoding of `model` if something made one (the app with --compile), else None."""
    return _decodings.get(model)


class CompiledDecoding:
    """decode_step compiled for one model; `step` is its drop-in replacement.

    A shape (batch size, cache slots) met for the first time is compiled right there, unless a background
    thread (compile_in_background, for the app) is building it: then the eager step answers meanwhile."""

    def __init__(self, model):
        # A weak reference: _decodings is keyed weakly by the model, so a strong one would keep an evicted
        # model (the app's shelf) and its programs alive for the life of the process.
        self._model = weakref.ref(model)
        device = model.token_embedding.weight.device
        if device.type == "cuda":
            self.compiled = torch.compile(decode_step, fullgraph=True, dynamic=False, mode="reduce-overhead")
        else:
            self.compiled = torch.compile(cpu_decode_step, fullgraph=True, dynamic=False, options={
                "realize_acc_reads_threshold": 1,
                "guard_filter_fn": first_block_guards,
                "size_asserts": False})
        self.ready, self.building, self.failed = set(), set(), None
        self.lock = threading.Lock()

    @property
    def model(self):
        return self._model()

    @staticmethod
    def report(line):
        print(line, file=sys.stderr, flush=True)

    def step(self, model, kv_cache, token, slot):
        """decode_step(model, kv_cache, token, slot), compiled where it can be."""
        shape = kv_cache.filled.shape
        if shape not in self.ready:
            if self.failed or self.building or not self.build(kv_cache, token, slot):
                return decode_step(model, kv_cache, token, slot)
        if not _compiling.acquire(blocking=False):  # a build is under way: every guard is checked meanwhile
            return self.compiled(model, kv_cache, token, slot)
        try:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):  # built: see the module's doc
                return self.compiled(model, kv_cache, token, slot)
        finally:
            _compiling.release()

    def ready_slots(self, batch_size, tokens):
        """The fewest cache slots, at least those `tokens` positions need, for which the step of `batch_size`
        sequences is compiled, or None. A prompt shorter than the one compiled for uses its program: attending
        over more empty slots costs less than compiling again."""
        needed = cache_slots(tokens, self.model.config["context_size"])
        return min((slots for batch, slots in self.ready if batch == batch_size and slots >= needed), default=None)

    def is_ready(self, batch_size, tokens):
        """Whether a step for `batch_size` sequences of up to `tokens` positions is compiled."""
        return self.ready_slots(batch_size, tokens) is not None

    def cache_for(self, batch_size, tokens):
        """A StaticKVCache for `batch_size` sequences of up to `tokens` positions: with as many slots as a
        compiled step has (ready_slots), else with as many as they need (the step then compiles for it).
        (A number of slots is its own bucket, so it asks StaticKVCache.for_model for exactly that many.)"""
        return StaticKVCache.for_model(self.model, batch_size, self.ready_slots(batch_size, tokens) or tokens)

    def ready_or_build_in_background(self, batch_size, tokens):
        """is_ready(batch_size, tokens); when not, the build starts in the background (unless one is under
        way or compiling failed here), for a later request to find."""
        if self.is_ready(batch_size, tokens):
            return True
        if not self.building and not self.failed:
            self.compile_in_background(batch_size, tokens)
        return False

    def build(self, kv_cache, token, slot):
        """Compile for the shape of these inputs, running the step once on them; whether it worked."""
        batch, slots = shape = kv_cache.filled.shape
        with self.lock:
            if shape in self.ready:
                return True
            if self.failed:
                return False
            self.building.add(shape)
            cached_before, start = cached_files(), time.perf_counter()
            try:
                with _compiling:
                    self.compiled(self.model, kv_cache, token, slot)
            except Exception as error:  # torch.compile raises many kinds of errors where it cannot run here
                self.failed = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
                self.report(f"The decoding step could not be compiled here ({self.failed[:200]}): generating "
                            "with the eager step.")
                return False
            finally:
                self.building.discard(shape)
            self.ready.add(shape)
            seconds, compiled = time.perf_counter() - start, cached_files() - cached_before
        from . import generation_dtype

        what = f"the decoding step for batch {batch}, {slots} cache slots, {generation_dtype(self.model)}"
        self.report(f"Compiled {what} in {seconds:.1f} s (kept in {cache_folder()})." if compiled else
                    f"Loaded {what} from the on-disk cache ({cache_folder()}) in {seconds:.1f} s.")
        return True

    def compile_in_background(self, batch_size, tokens):
        """Build the step for `batch_size` sequences of up to `tokens` positions in a daemon thread (the app
        serves with the eager step meanwhile)."""
        shape = (batch_size, cache_slots(tokens, self.model.config["context_size"]))

        def build():
            try:
                with torch.inference_mode():
                    cache = StaticKVCache.for_model(self.model, batch_size, tokens)
                    token = torch.zeros(batch_size, 1, dtype=torch.long, device=cache.filled.device)
                    self.build(cache, token, torch.zeros(1, dtype=torch.long, device=cache.filled.device))
            finally:  # also when the cache could not be made: a later request may try again
                self.building.discard(shape)

        self.building.add(shape)
        threading.Thread(target=build, daemon=True, name="compile-decoding-step").start()


LATER_BLOCK = re.compile(r"_modules\['blocks'\]\._modules\['[1-9]")  # a guard's source in block 1, 2, ...


def first_block_guards(guards):
    """Which of Dynamo's guards on the compiled step to keep: all but those on the modules of blocks 1, 2...
    GPT-2's blocks are made alike (one class, one config, each prepared as the others), so the checks on
    the first block's modules, weights and dtypes stand for every block's, and the KV cache's layer count
    for their number."""
    return [not LATER_BLOCK.search(guard.name) for guard in guards]


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


def use_project_compile_cache():
    """Point inductor's on-disk caches at COMPILE_CACHE, unless the user chose a folder
    (TORCHINDUCTOR_CACHE_DIR). Done on import: inductor fixes its folder the first time anything asks."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(COMPILE_CACHE))


use_project_compile_cache()


def cache_folder():
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def cached_files():
    """The files in inductor's cache: a compilation adds some, finding it all on disk adds none."""
    return {path for path in cache_folder().rglob("*") if path.is_file()}

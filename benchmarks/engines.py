"""The engines W1 is measured against (benchmarks/bench_engines.py), each run as its users run it: greedy
tokens at batch 1 from the same random GPT-2 weights, in a worker process of its own.

The weights are the reference model's of benchmarks/reference.py (transformers' GPT2LMHeadModel, random
from the seed), saved once with save_pretrained; every engine's own format is converted from that folder,
with no network:

- CTranslate2: its transformers converter, in float32 or int8 (int8 matrices with a scale per row,
  `ct2-transformers-converter --quantization int8`);
- ONNX Runtime: our GPTModel (the same weights) exported by torch.onnx as optimum exports GPT-2 for
  generation, one graph taking the input ids and every layer's past keys and values and giving the last
  position's logits and the keys and values with the new tokens' (optimum itself pins an older
  transformers); int8 by onnxruntime's quantize_dynamic (int8 weights, activations quantized per call);
- llama.cpp: a GGUF file written with llama.cpp's own gguf package, in bfloat16 or q8_0 (int8 in blocks of
  32 weights with a scale each), run by llama-cpp-python.

A worker is `python -m benchmarks.engines ENGINE DTYPE --folder F --threads N`; it imports nothing but the
engine it runs (CTranslate2 and torch each bring an OpenMP runtime, and two in one process fight over the
cores), says it is ready, then answers each request {"prompt": ids, "new_tokens": n} with the seconds the
generation took and its tokens, until its stdin closes. `--convert` makes the engine's files instead.
"""
import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

# engine: (its dtypes, the modules it needs as (import name, pip name)); ours and transformers need only
# what the project itself needs.
ENGINES = {
    "ours": (("float32", "bfloat16", "int8"), ()),
    "transformers": (("float32",), ()),
    "ctranslate2": (("int8", "float32"), (("ctranslate2", "ctranslate2"),)),
    "onnxruntime": (("int8", "float32"), (("onnxruntime", "onnxruntime"), ("onnx", "onnx"))),
    "llama.cpp": (("bfloat16", "q8_0"), (("llama_cpp", "llama-cpp-python"), ("gguf", "gguf"))),
}
BYTES_PER_WEIGHT = {"float32": 4, "bfloat16": 2, "int8": 1, "q8_0": 34 / 32}  # q8_0: 32 int8 + a 2-byte scale


def missing_package(engine):
    """Why `engine` cannot run here (the package it needs is not installed), or None."""
    for module, package in ENGINES[engine][1]:
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed (pip install -r requirements-bench.txt)"
    return None


def bytes_read_per_token(config, dtype):
    """The fewest bytes a generated token reads at batch 1 in `dtype`: every matrix once (the blocks' and
    the head's) at the dtype's bytes a weight, the biases and norms in float32. Of the embedding tables a
    token reads one row: not counted. The same count for every engine, so their shares of the bound compare."""
    width, layers = config["embedding_dim"], config["num_layers"]
    matrices = layers * 12 * width**2 + config["vocab_size"] * width  # qkv 3, out 1, feed-forward 4 + 4
    vectors = layers * 13 * width + 2 * width  # biases 3 + 1 + 4 + 1, two norms of 2 a block; the final norm
    return matrices * BYTES_PER_WEIGHT[dtype] + vectors * 4


class WorkerChannel:
    """The worker's side of benchmarks.measure.ResidentWorker. Made first thing: the messages get stdout to
    themselves, and whatever the engine's libraries print goes to stderr, where it cannot break a message."""

    def __init__(self):
        self._messages = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)

    def send(self, values):
        self._messages.write(json.dumps(values) + "\n")

    def requests(self):
        """The requests, each a dict, until the benchmark closes the worker's stdin."""
        for line in sys.stdin:
            yield json.loads(line)


def transformers_folder(folder):
    return Path(folder) / "transformers"


def save_shared_weights(config, seed, folder):
    """The random weights every engine runs, saved once into `folder`/transformers (safetensors)."""
    target = transformers_folder(folder)
    if (target / "model.safetensors").is_file():
        return target
    import torch

    from benchmarks.reference import reference_model

    reference_model(config, seed, torch.device("cpu")).save_pretrained(target)
    return target


class TorchRunner:
    """A side that runs in torch: `run(ids, new_tokens)` is benchmarks/bench_generation.py's generator."""

    def __init__(self, threads):
        import torch

        torch.set_num_threads(threads)
        self.torch = torch

    def generate(self, prompt, new_tokens):
        ids = self.torch.tensor([prompt])
        return self.run(ids, new_tokens)[0, len(prompt):].tolist()


class Ours(TorchRunner):
    """This project's generation as the scripts run it: load_gpt2_from_hf, prepare_for_generation for the
    dtype, generate (compiled: with a CompiledDecoder, the static KV cache and the compiled step)."""

    def __init__(self, folder, dtype, threads, compiled=False):
        super().__init__(threads)
        from benchmarks.bench_generation import generator_of
        from modules.pretrained import load_gpt2_from_hf

        self.run = generator_of("ours", load_gpt2_from_hf(transformers_folder(folder)), dtype, compiled)


class Transformers(TorchRunner):
    """GPT2LMHeadModel.generate, greedy with its cache, never stopping at <|endoftext|>."""

    def __init__(self, folder, dtype, threads, compiled=False):
        super().__init__(threads)
        import transformers

        from benchmarks.bench_generation import generator_of

        transformers.logging.set_verbosity_error()
        model = transformers.GPT2LMHeadModel.from_pretrained(transformers_folder(folder))
        self.run = generator_of("reference", model)


class CTranslate2:
    """ctranslate2.Generator.generate_batch, greedy (sampling_topk=1), exactly `new_tokens` tokens (no end
    token). Its tokens are the ids written as strings (IdVocabulary)."""

    def __init__(self, folder, dtype, threads, compiled=False):
        import ctranslate2

        supported = ctranslate2.get_supported_compute_types("cpu")
        if dtype not in supported:
            raise RuntimeError(f"this CPU build of CTranslate2 has no {dtype} (it has {', '.join(sorted(supported))})")
        self.generator = ctranslate2.Generator(str(Path(folder) / f"ctranslate2-{dtype}"), device="cpu",
                                               compute_type=dtype, intra_threads=threads, inter_threads=1)

    def generate(self, prompt, new_tokens):
        result = self.generator.generate_batch(
            [[str(token) for token in prompt]], max_length=new_tokens, min_length=new_tokens, end_token=[],
            include_prompt_in_result=False, sampling_topk=1, beam_size=1)
        return list(result[0].sequences_ids[0])


class IdVocabulary:
    """What CTranslate2's converter asks of a tokenizer: a vocabulary of the model's size, each id's token
    its own number (the benchmark feeds ids, so no text tokenizer is needed, whatever the vocabulary size)."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size
        self.bos_token = self.eos_token = self.unk_token = str(vocab_size - 1)  # <|endoftext|> in GPT-2

    def get_vocab(self):
        return {str(token): token for token in range(self.vocab_size)}


def convert_ctranslate2(folder, dtype):
    import ctranslate2

    class Converter(ctranslate2.converters.TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            config = json.loads((Path(model_name_or_path) / "config.json").read_text())
            return IdVocabulary(config["vocab_size"])

    Converter(str(transformers_folder(folder))).convert(str(Path(folder) / f"ctranslate2-{dtype}"),
                                                         quantization=dtype, force=True)


class OnnxRuntime:
    """onnxruntime.InferenceSession on the exported graph, a greedy loop in numpy that feeds each step's
    keys and values back as the next one's past (as optimum's ORTModelForCausalLM does on the CPU)."""

    def __init__(self, folder, dtype, threads, compiled=False):
        import numpy
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = onnxruntime.InferenceSession(str(onnx_path(folder, dtype)), options,
                                                    providers=["CPUExecutionProvider"])
        self.numpy = numpy
        self.past = [meta for meta in self.session.get_inputs() if meta.name.startswith("past_")]

    def generate(self, prompt, new_tokens):
        numpy = self.numpy
        _, heads, _, head_dim = self.past[0].shape
        feeds = {meta.name: numpy.zeros((1, heads, 0, head_dim), numpy.float32) for meta in self.past}
        ids, tokens = numpy.array([prompt], dtype=numpy.int64), []
        for _ in range(new_tokens):
            logits, *present = self.session.run(None, {"input_ids": ids, **feeds})
            tokens.append(int(logits[0].argmax()))
            feeds = {meta.name: values for meta, values in zip(self.past, present)}
            ids = numpy.array([[tokens[-1]]], dtype=numpy.int64)
        return tokens


def onnx_path(folder, dtype):
    return Path(folder) / f"onnx-{dtype}" / "model.onnx"


class ConcatenatingCache:
    """A KV cache as an exported graph sees it: each layer's past keys and values in, the same with the new
    tokens' appended out (the model's layers call update() as they do on modules/inference.py's caches)."""

    def __init__(self, past):
        self.layers = [ConcatenatingLayer(keys, values) for keys, values in zip(past[0::2], past[1::2])]

    def present(self):
        return [tensor for layer in self.layers for tensor in (layer.keys, layer.values)]


class ConcatenatingLayer:
    def __init__(self, keys, values):
        self.keys, self.values = keys, values

    def update(self, keys, values):
        import torch

        self.keys, self.values = torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)
        return self.keys, self.values


def export_onnx(folder):
    """Our GPTModel on the shared weights as one ONNX graph: (input_ids, past_key_0, past_value_0, ...) ->
    (logits of the last position, present_key_0, present_value_0, ...), the past of any length (0 for the
    prompt), batch 1 and no padding, so the mask is causal after the past."""
    import torch

    from modules.inference import attention_mask_for
    from modules.pretrained import load_gpt2_from_hf

    model = load_gpt2_from_hf(transformers_folder(folder))

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, *past):
            cache, new = ConcatenatingCache(past), input_ids.shape[1]
            past_length = past[0].shape[2]
            positions = torch.arange(past_length, past_length + new)[None]
            mask = attention_mask_for(None, past_length, new, input_ids.device)
            return (self.model(input_ids, positions, mask, cache)[:, -1], *cache.present())

    config = model.config
    names = [f"{kind}_{layer}" for layer in range(config["num_layers"]) for kind in ("key", "value")]
    head_dim = config["embedding_dim"] // config["num_heads"]
    # Traced with one past token, so that the graph builds the mask (with none, no mask is needed).
    past = [torch.zeros(1, config["num_heads"], 1, head_dim) for _ in names]
    path = onnx_path(folder, "float32")
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        torch.onnx.export(
            Step().eval(), (torch.zeros(1, 1, dtype=torch.long), *past), str(path), dynamo=False,
            input_names=["input_ids", *(f"past_{name}" for name in names)],
            output_names=["logits", *(f"present_{name}" for name in names)],
            dynamic_axes={"input_ids": {1: "tokens"}, **{f"past_{name}": {2: "past"} for name in names},
                          **{f"present_{name}": {2: "past_and_tokens"} for name in names}})


def convert_onnx(folder, dtype):
    if not onnx_path(folder, "float32").is_file():
        export_onnx(folder)
    if dtype == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        onnx_path(folder, dtype).parent.mkdir(parents=True, exist_ok=True)
        quantize_dynamic(str(onnx_path(folder, "float32")), str(onnx_path(folder, dtype)), weight_type=QuantType.QInt8)


class LlamaCpp:
    """llama-cpp-python's Llama.generate on the GGUF file: greedy (temperature 0, no repeat penalty), cut
    after exactly `new_tokens` (it never stops by itself), reset first so that a run does not reuse the
    previous one's KV cache through its prompt-prefix matching."""

    def __init__(self, folder, dtype, threads, compiled=False):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(gguf_path(folder, dtype)), n_ctx=1024, n_batch=512,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)

    def generate(self, prompt, new_tokens):
        self.llm.reset()
        tokens = []
        for token in self.llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                       reset=True):
            tokens.append(int(token))
            if len(tokens) == new_tokens:
                return tokens
        return tokens


def gguf_path(folder, dtype):
    return Path(folder) / "gguf" / f"gpt2-{dtype}.gguf"


# Our parameter names -> llama.cpp's GPT-2 tensors: the model's own, then each block's layers ("{}" is the
# block's number), whose scale/shift (LayerNorm) or weight/bias (Linear) llama.cpp names weight/bias.
GGUF_NAMES = {"token_embedding.weight": "token_embd.weight", "position_embedding.weight": "position_embd.weight",
              "final_norm.scale": "output_norm.weight", "final_norm.shift": "output_norm.bias",
              "out_head.weight": "output.weight"}
GGUF_LAYERS = {"norm1": "attn_norm", "attention.qkv_proj": "attn_qkv", "attention.out_proj": "attn_output",
               "norm2": "ffn_norm", "feed_forward.expand": "ffn_up", "feed_forward.project": "ffn_down"}
GGUF_NAMES.update({f"blocks.{{}}.{ours}.{part}": f"blk.{{}}.{theirs}.{'weight' if part in ('scale', 'weight') else 'bias'}"
                   for ours, theirs in GGUF_LAYERS.items()
                   for part in (("scale", "shift") if ours.startswith("norm") else ("weight", "bias"))})


def convert_gguf(folder, dtype):
    """The shared weights as llama.cpp's GPT-2: its metadata, GPT-2's tokenizer (llama.cpp will not load a
    model without one), the matrices in `dtype` and the vectors in float32. Our matrices are (out, in), the
    row-major layout llama.cpp's products read (GGUF lists the dimensions innermost first)."""
    import gguf

    from modules.pretrained import load_gpt2_from_hf
    from modules.tokenizer import BPE_DIR

    model = load_gpt2_from_hf(transformers_folder(folder))
    config = model.config
    encoder = json.loads((BPE_DIR / "encoder.json").read_text(encoding="utf-8"))
    if len(encoder) != config["vocab_size"]:
        raise RuntimeError(f"llama.cpp needs GPT-2's tokenizer, of {len(encoder):,} tokens; this model has "
                           f"{config['vocab_size']:,}")
    path = gguf_path(folder, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_context_length(config["context_size"])
    writer.add_embedding_length(config["embedding_dim"])
    writer.add_feed_forward_length(4 * config["embedding_dim"])
    writer.add_block_count(config["num_layers"])
    writer.add_head_count(config["num_heads"])
    writer.add_layer_norm_eps(1e-5)
    writer.add_file_type({"bfloat16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(sorted(encoder, key=encoder.get))
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(encoder) - 1) + [gguf.TokenType.CONTROL])
    merges = (BPE_DIR / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    writer.add_token_merges([merge for merge in merges if merge])
    writer.add_bos_token_id(len(encoder) - 1)
    writer.add_eos_token_id(len(encoder) - 1)
    kind = {"bfloat16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    names = {ours.format(block): theirs.format(block) for ours, theirs in GGUF_NAMES.items()
             for block in range(config["num_layers"])}
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if array.ndim == 2 and name != "position_embedding.weight":
            writer.add_tensor(names[name], gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(names[name], array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


RUNNERS = {"ours": Ours, "transformers": Transformers, "ctranslate2": CTranslate2, "onnxruntime": OnnxRuntime,
           "llama.cpp": LlamaCpp}
CONVERTERS = {"ctranslate2": convert_ctranslate2, "onnxruntime": convert_onnx, "llama.cpp": convert_gguf}
CONVERTED = {"ctranslate2": lambda folder, dtype: Path(folder) / f"ctranslate2-{dtype}" / "model.bin",
             "onnxruntime": onnx_path, "llama.cpp": gguf_path}


def convert(engine, dtype, folder):
    """Make `engine`'s files for `dtype` from the shared weights in `folder`, unless they are there."""
    if engine in CONVERTERS and not CONVERTED[engine](folder, dtype).is_file():
        CONVERTERS[engine](folder, dtype)


def serve(engine, dtype, folder, threads, compiled):
    """The worker: load the engine, then answer every request with the seconds and the tokens of a run."""
    channel = WorkerChannel()
    try:
        runner = RUNNERS[engine](folder, dtype, threads, compiled)
    except Exception as error:  # whatever the engine raises: the benchmark reports it and goes on
        channel.send({"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"})
        return
    channel.send({"ready": True})
    for request in channel.requests():
        start = time.perf_counter()
        tokens = runner.generate(request["prompt"], request["new_tokens"])
        channel.send({"seconds": time.perf_counter() - start, "tokens": tokens})


def main():
    parser = argparse.ArgumentParser(description="One engine of benchmarks/bench_engines.py (a worker).")
    parser.add_argument("engine", choices=list(ENGINES))
    parser.add_argument("dtype")
    parser.add_argument("--folder", type=Path, required=True, help="the shared weights and their conversions")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--compiled", action="store_true", help="ours: the decoding step compiled")
    parser.add_argument("--convert", action="store_true", help="make the engine's files, then stop")
    args = parser.parse_args()
    if args.convert:
        convert(args.engine, args.dtype, args.folder)
        print(json.dumps({"converted": True}))
    else:
        serve(args.engine, args.dtype, args.folder, args.threads, args.compiled)


if __name__ == "__main__":
    main()

"""Download OpenAI's GPT-2 weights and load them into GPTModel.

    python get_gpt_weights.py --model 124M --save checkpoints/gpt2-124M.pt
    python get_gpt_weights.py --from-hf path/to/gpt2-snapshot --save checkpoints/gpt2-124M.pt

OpenAI published GPT-2 (124M, 355M, 774M and 1558M parameters) as TensorFlow 1 checkpoints. This
script downloads one into gpt2/<size>/ (resuming, retrying, skipping files already there), reads it
one variable at a time with TensorFlow (imported only here, so no other script pays for it), and
builds our GPTModel directly from those tensors. A Hugging Face copy of GPT-2 (config.json plus
model.safetensors or pytorch_model.bin) loads the same way without TensorFlow.

Python: `load_gpt2("gpt2/124M")`, `load_gpt2_from_hf(directory)`, `download_and_load_gpt2("124M")`.
"""
import argparse
import json
import os
import pickle
import re
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from modules.speed import empty_model, model_from_state_dict
from modules.checkpoint import save_checkpoint
from modules.config import ConfigError, validate_config
from modules.device import get_device
from modules.download import download_file
from modules.errors import UserError, run_main
from modules.generation import stream_text
from modules.tokenizer import END_OF_TEXT_ID

BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
MODEL_SIZES = ("124M", "355M", "774M", "1558M")
# What OpenAI's download script fetches for each size: the TensorFlow checkpoint, its hyperparameters
# and the BPE vocabulary.
FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001", "model.ckpt.index",
         "model.ckpt.meta", "vocab.bpe")

# Our parameter name for each of GPT-2's, as OpenAI's checkpoint names them (without "model/").
# GPT-2 implements linear layers as Conv1D with the weight stored (in, out); nn.Linear stores
# (out, in), so every "/w" is transposed. "g" and "b" of a LayerNorm are its scale and shift.
_LAYER_NAMES = {
    "ln_1/g": "norm1.scale", "ln_1/b": "norm1.shift",
    "attn/c_attn/w": "attention.qkv_proj.weight", "attn/c_attn/b": "attention.qkv_proj.bias",
    "attn/c_proj/w": "attention.out_proj.weight", "attn/c_proj/b": "attention.out_proj.bias",
    "ln_2/g": "norm2.scale", "ln_2/b": "norm2.shift",
    "mlp/c_fc/w": "feed_forward.expand.weight", "mlp/c_fc/b": "feed_forward.expand.bias",
    "mlp/c_proj/w": "feed_forward.project.weight", "mlp/c_proj/b": "feed_forward.project.bias",
}
_GLOBAL_NAMES = {
    "wte": "token_embedding.weight", "wpe": "position_embedding.weight",
    "ln_f/g": "final_norm.scale", "ln_f/b": "final_norm.shift",
}
# hparams.json's keys and the Hugging Face config.json's, each with our config key.
OPENAI_CONFIG_KEYS = {"n_vocab": "vocab_size", "n_ctx": "context_size", "n_embd": "embedding_dim",
                      "n_head": "num_heads", "n_layer": "num_layers"}
HF_CONFIG_KEYS = {"vocab_size": "vocab_size", "n_positions": "context_size", "n_embd": "embedding_dim",
                  "n_head": "num_heads", "n_layer": "num_layers"}
# Hugging Face GPT-2 options our model does not implement: {key: (value when absent, values we support)}.
HF_FIXED_SETTINGS = {
    "activation_function": ("gelu_new", ("gelu_new", "gelu_pytorch_tanh")),
    "layer_norm_epsilon": (1e-5, (1e-5,)),
    "scale_attn_weights": (True, (True,)),
    "scale_attn_by_inverse_layer_idx": (False, (False,)),
    "n_inner": (None, (None,)),
    "tie_word_embeddings": (True, (True,)),
}


def gpt2_name_to_ours(name):
    """'h3/attn/c_attn/w' -> 'blocks.3.attention.qkv_proj.weight'; None for names GPT-2 has and we do not."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = re.fullmatch(r"h(\d+)/(.+)", name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"blocks.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def hf_name_to_gpt2(name):
    """Hugging Face's 'transformer.h.3.attn.c_attn.weight' -> OpenAI's 'h3/attn/c_attn/w'."""
    name = re.sub(r"^h\.(\d+)\.", r"h\1/", name.removeprefix("transformer.")).replace(".", "/")
    path, _, leaf = name.rpartition("/")
    if path in ("wte", "wpe"):
        return path
    is_norm = path.rsplit("/", 1)[-1].startswith("ln_")
    return f"{path}/{'b' if leaf == 'bias' else 'g' if is_norm else 'w'}"


def convert_gpt2_weights(gpt2_tensors):
    """Our state dict from OpenAI-named tensors; weights are transposed as described above.

    gpt2_tensors: a dict {name: tensor}, emptied as it goes, or an iterable of (name, tensor) pairs
    read one at a time from a file; either way at most one weight exists twice at any moment."""
    if isinstance(gpt2_tensors, dict):
        pairs = ((name, gpt2_tensors.pop(name)) for name in list(gpt2_tensors))
    else:
        pairs = gpt2_tensors
    state_dict = {}
    for name, tensor in pairs:
        ours = gpt2_name_to_ours(name)
        if ours is None:
            continue
        if name.endswith("/w"):
            tensor = tensor.reshape(tensor.shape[-2:]).t().contiguous()
        state_dict[ours] = tensor
    state_dict["out_head.weight"] = state_dict["token_embedding.weight"]
    return state_dict


# --- Downloading -------------------------------------------------------------------------------

def download_gpt2(model_size, models_dir="gpt2", base_url=BASE_URL, **download_options):
    """Fetch OpenAI's files for `model_size` into models_dir/model_size (files already there are kept)."""
    if model_size not in MODEL_SIZES:
        raise UserError(f"unknown GPT-2 size {model_size!r}; OpenAI published {', '.join(MODEL_SIZES)}")
    model_dir = Path(models_dir) / model_size
    url = f"{base_url}/{model_size}"
    hint = (f"Without network access, download {', '.join(FILES)} from {url}/ on another machine and put them "
            f"in {model_dir}/ (or pass --from-hf with a Hugging Face copy of GPT-2).")
    for name in FILES:
        download_file(f"{url}/{name}", model_dir / name, hint=hint, **download_options)
    return model_dir


def download_and_load_gpt2(model_size, models_dir="gpt2"):
    """GPTModel with OpenAI's weights for `model_size` ("124M" ...), downloaded first if needed."""
    return load_gpt2(download_gpt2(model_size, models_dir))


# --- Loading -----------------------------------------------------------------------------------

def load_gpt2(model_dir):
    """GPTModel (eval mode, CPU, float32) holding an OpenAI GPT-2 checkpoint directory's weights.

    The directory holds hparams.json, `checkpoint` and model.ckpt.* as OpenAI published them; any
    size works, the config comes from hparams.json."""
    model_dir = Path(model_dir)
    config = _config_from(_read_json(model_dir / "hparams.json", "an OpenAI GPT-2 directory"), OPENAI_CONFIG_KEYS,
                          model_dir / "hparams.json")
    tf = _import_tensorflow()
    prefix = tf.train.latest_checkpoint(str(model_dir)) or str(model_dir / "model.ckpt")
    prefix_name = Path(prefix).name
    if not Path(prefix + ".index").is_file() or not list(model_dir.glob(f"{prefix_name}.data-*")):
        raise UserError(f"{model_dir} has no complete TensorFlow checkpoint ({prefix_name}.index and "
                        f"{prefix_name}.data-00000-of-00001 are needed); {_how_to_get(model_dir)}")
    # TensorFlow reports a truncated or corrupt file as an OpError, or as IndexError/ValueError.
    read_errors = (tf.errors.OpError, IndexError, ValueError)
    try:
        reader = tf.train.load_checkpoint(prefix)
        variables = {name.removeprefix("model/"): (name, shape)
                     for name, shape in reader.get_variable_to_shape_map().items() if name.startswith("model/")}
        # from_numpy shares the array TensorFlow filled: no copy besides the transpose of "/w" weights.
        return _build_gpt2(config, variables, lambda name: torch.from_numpy(reader.get_tensor(name)),
                           model_dir / "hparams.json")
    except read_errors as error:
        raise UserError(f"could not read the checkpoint {prefix}: {getattr(error, 'message', error)}; "
                        f"the files may be incomplete. {_how_to_get(model_dir)}") from None


def load_gpt2_from_hf(hf_dir):
    """GPTModel (eval mode, CPU, float32) from a Hugging Face GPT-2 directory: config.json plus
    model.safetensors (possibly sharded) or pytorch_model.bin, as save_pretrained or a downloaded
    openai-community/gpt2 snapshot has them."""
    hf_dir = Path(hf_dir)
    hf_config = _read_json(hf_dir / "config.json", "a Hugging Face model directory")
    if hf_config.get("model_type") != "gpt2":
        raise UserError(f"{hf_dir} holds a {hf_config.get('model_type')!r} model, not GPT-2 "
                        "(its config.json must say \"model_type\": \"gpt2\")")
    for key, (default, supported) in HF_FIXED_SETTINGS.items():
        if hf_config.get(key, default) not in supported:
            raise UserError(f"{hf_dir}/config.json sets {key}={hf_config[key]!r}; this GPT-2 implementation "
                            f"supports {' or '.join(repr(value) for value in supported)}")
    config = _config_from(hf_config, HF_CONFIG_KEYS, hf_dir / "config.json")
    with ExitStack() as open_files:
        variables, read_tensor = _open_hf_weights(hf_dir, open_files)
        return _build_gpt2(config, variables, read_tensor, hf_dir / "config.json")


def _open_hf_weights(hf_dir, open_files):
    """({OpenAI name: (stored name, shape)}, read_tensor(stored name)) for a Hugging Face directory."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "a sharded safetensors model")["weight_map"]
        files = sorted({hf_dir / name for name in weight_map.values()})
    elif (hf_dir / "model.safetensors").is_file():
        files = [hf_dir / "model.safetensors"]
    elif (hf_dir / "pytorch_model.bin").is_file():
        return _open_pytorch_bin(hf_dir / "pytorch_model.bin")
    else:
        raise UserError(f"{hf_dir} has no model.safetensors or pytorch_model.bin; download the whole snapshot, "
                        f"e.g. `huggingface-cli download openai-community/gpt2 --local-dir {hf_dir}`")
    from safetensors import SafetensorError, safe_open

    variables, handles = {}, {}
    try:
        for path in files:
            handle = open_files.enter_context(safe_open(path, framework="pt"))
            for name in handle.keys():
                variables[hf_name_to_gpt2(name)] = (name, handle.get_slice(name).get_shape())
                handles[name] = handle
    except (SafetensorError, OSError) as error:
        raise UserError(f"could not read the weights in {hf_dir}: {error}") from None
    return variables, lambda name: handles[name].get_tensor(name)


def _open_pytorch_bin(path):
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise UserError(f"could not read {path} ({str(error).splitlines()[0]}); it must be a state dict "
                        "saved with torch.save") from None
    variables = {hf_name_to_gpt2(name): (name, tuple(tensor.shape)) for name, tensor in state_dict.items()}
    return variables, state_dict.pop  # each tensor leaves the dict as it is converted


def _build_gpt2(config, variables, read_tensor, config_path):
    """GPTModel from {OpenAI name: (stored name, stored shape)}, reading each tensor once.

    Every shape is checked before a byte of weights is read, so a mismatch costs nothing and names
    the variable. The largest tensors are read first: the one extra copy a transpose makes then
    happens while little else is in memory, which keeps the peak near one copy of the model."""
    expected = _expected_shapes(config)
    missing = [name for name in expected if name not in variables]
    if missing:
        raise UserError(f"{config_path} describes a model with weights that {config_path.parent} lacks: "
                        f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    for name, (stored_name, stored_shape) in variables.items():
        if name in expected:
            needed = _stored_shape(name, stored_shape, expected[name])
            if list(stored_shape) != needed:
                raise UserError(f"{stored_name} in {config_path.parent} has shape {list(stored_shape)}, but "
                                f"{config_path} describes a model that needs {needed}")
        elif gpt2_name_to_ours(name) is not None:
            raise UserError(f"{stored_name} in {config_path.parent} is not part of the model {config_path} "
                            f"describes ({config['num_layers']} layers)")
    largest_first = sorted(expected, key=lambda name: -expected[name].numel())
    tensors = ((name, read_tensor(variables[name][0]).float()) for name in largest_first)
    return model_from_state_dict(config, convert_gpt2_weights(tensors)).eval()


def _expected_shapes(config):
    """{OpenAI name: our parameter's shape} for every weight a model of `config` has."""
    state_dict = empty_model(config).state_dict()
    names = list(_GLOBAL_NAMES) + [f"h{layer}/{name}" for layer in range(config["num_layers"]) for name in _LAYER_NAMES]
    return {name: state_dict[gpt2_name_to_ours(name)].shape for name in names}


def _stored_shape(name, stored_shape, our_shape):
    """The shape a checkpoint must store for our `our_shape`: Conv1D weights are (in, out), after
    a leading 1 in OpenAI's files ([1, in, out]) and none in Hugging Face's."""
    if name.endswith("/w"):
        return [1] * max(len(stored_shape) - 2, 0) + list(reversed(our_shape))
    return list(our_shape)


def _config_from(values, key_map, path):
    """Our config dict from a hparams.json / config.json dict, using key_map {their key: our key}."""
    missing = [key for key in key_map if values.get(key) is None]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; it needs {', '.join(key_map)}")
    # GPT-2 trained with dropout 0.1 (what fine-tuning starts from); in eval mode it does nothing.
    config = {ours: values[theirs] for theirs, ours in key_map.items()} | {"drop_rate": 0.1, "qkv_bias": True}
    try:
        return validate_config(config)
    except ConfigError as error:
        raise UserError(f"{path}: {error}") from None


def _read_json(path, what):
    if not path.is_file():
        raise UserError(f"{path} does not exist; {path.parent} is not {what}. {_how_to_get(path.parent)}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error})") from None


def _how_to_get(model_dir):
    return (f"Run `python get_gpt_weights.py --model 124M` (or 355M, 774M, 1558M) to download OpenAI's files, "
            f"or put them ({', '.join(FILES)}) in {model_dir}/ by hand from {BASE_URL}/<size>/.")


def _import_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    try:
        import tensorflow as tf
    except ImportError:
        raise UserError("reading OpenAI's checkpoints needs TensorFlow: `pip install tensorflow-cpu` "
                        "(or load a Hugging Face copy of GPT-2 with --from-hf DIR)") from None
    return tf


# --- Command line ------------------------------------------------------------------------------

def print_sample(model, prompt, max_new_tokens):
    """Print a greedy continuation of `prompt`, so the user sees that the weights work."""
    if max_new_tokens <= 0:
        return
    if model.config["vocab_size"] <= END_OF_TEXT_ID:
        print(f"(no sample: the model's {model.config['vocab_size']} tokens are not GPT-2's vocabulary)")
        return
    print(f"Greedy continuation:\n{prompt}", end="", flush=True)
    for piece in stream_text(model, prompt, max_new_tokens):
        print(piece, end="", flush=True)
    print()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="124M",
                        help=f"a GPT-2 size to download and load ({', '.join(MODEL_SIZES)}), or a directory holding "
                             "a checkpoint in OpenAI's layout (default: 124M)")
    source.add_argument("--from-hf", metavar="DIR", type=Path,
                        help="load a Hugging Face GPT-2 directory instead "
                             "(config.json + model.safetensors or pytorch_model.bin)")
    parser.add_argument("--models-dir", type=Path, default=Path("gpt2"),
                        help="where downloads go, one folder per size (default: gpt2/)")
    parser.add_argument("--base-url", default=BASE_URL, help="where to download from (a mirror of OpenAI's storage)")
    parser.add_argument("--save", type=Path, metavar="PATH",
                        help="write the model as an 'lm' checkpoint, e.g. checkpoints/gpt2-124M.pt, for --init")
    parser.add_argument("--prompt", default="Every effort moves you", help="text to continue after loading")
    parser.add_argument("--max-new-tokens", type=int, default=25, help="length of the sample (0: none)")
    parser.add_argument("--device", help="where to run the sample: cuda, mps, cpu (default: the best available)")
    return parser.parse_args()


def main():
    args = parse_args()
    device = get_device(args.device)
    if args.from_hf:
        source, load = args.from_hf, load_gpt2_from_hf
    elif args.model in MODEL_SIZES:
        source, load = download_gpt2(args.model, args.models_dir, args.base_url), load_gpt2
    elif Path(args.model).is_dir():
        source, load = Path(args.model), load_gpt2
    else:
        raise UserError(f"--model {args.model}: use one of {', '.join(MODEL_SIZES)} or a directory holding "
                        "a checkpoint in OpenAI's layout")
    start = time.perf_counter()
    model = load(source)
    config = model.config
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(f"Loaded {source} in {time.perf_counter() - start:.1f} s: {parameters:,} parameters, "
          f"{config['num_layers']} layers, {config['embedding_dim']} dims, {config['num_heads']} heads")
    if args.save:
        save_checkpoint(args.save, model, "lm", source=str(source))
        print(f"Saved {args.save}; start other scripts from it with --init {args.save}")
    print_sample(model.to(device), args.prompt, args.max_new_tokens)


if __name__ == "__main__":
    run_main(main)

"""Hugging Face's copies of GPT-2 (config.json plus model.safetensors or pytorch_model.bin) read into
GPTModel, without TensorFlow."""
import pickle
from contextlib import ExitStack
from pathlib import Path

import torch

from ..errors import UserError
from ..files import read_json

from .build import build_gpt2, config_from
from .names import hf_name_to_gpt2

# config.json's keys, each with our config key.
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


def load_gpt2_from_hf(hf_dir):
    """GPTModel (eval mode, CPU, float32) from a Hugging Face GPT-2 directory: config.json plus
    model.safetensors (possibly sharded) or pytorch_model.bin, as save_pretrained or a downloaded
    openai-community/gpt2 snapshot has them."""
    hf_dir = Path(hf_dir)
    what = f"the config of a Hugging Face GPT-2 model, a JSON object; {_how_to_get(hf_dir)}"
    hf_config = read_json(hf_dir / "config.json", what, expect=dict)
    if hf_config.get("model_type") != "gpt2":
        raise UserError(f"{hf_dir} holds a {hf_config.get('model_type')!r} model, not GPT-2 "
                        "(its config.json must say \"model_type\": \"gpt2\")")
    for key, (default, supported) in HF_FIXED_SETTINGS.items():
        if hf_config.get(key, default) not in supported:
            raise UserError(f"{hf_dir}/config.json sets {key}={hf_config[key]!r}; this GPT-2 implementation "
                            f"supports {' or '.join(repr(value) for value in supported)}")
    config = config_from(hf_config, HF_CONFIG_KEYS, hf_dir / "config.json")
    with ExitStack() as open_files:
        variables, read_tensor = _open_hf_weights(hf_dir, open_files)
        return build_gpt2(config, variables, read_tensor, hf_dir / "config.json")


def _open_hf_weights(hf_dir, open_files):
    """({OpenAI name: (stored name, shape)}, read_tensor(stored name)) for a Hugging Face directory."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "the index of a sharded safetensors model", expect=dict).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} has no \"weight_map\" object; it should be the index of a sharded safetensors model")
        files = sorted({hf_dir / name for name in weight_map.values()})
    elif (hf_dir / "model.safetensors").is_file():
        files = [hf_dir / "model.safetensors"]
    elif (hf_dir / "pytorch_model.bin").is_file():
        return _open_pytorch_bin(hf_dir / "pytorch_model.bin")
    else:
        raise UserError(f"{hf_dir} has no model.safetensors or pytorch_model.bin; {_how_to_get(hf_dir)}")
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


def _how_to_get(hf_dir):
    return f"download the whole snapshot, e.g. `huggingface-cli download openai-community/gpt2 --local-dir {hf_dir}`"

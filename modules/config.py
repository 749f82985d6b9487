"""Model sizes.

The four GPT-2 sizes are OpenAI's hparams.json with the original project's key names:
n_vocab -> vocab_size, n_ctx -> context_size, n_embd -> embedding_dim, n_head -> num_heads,
n_layer -> num_layers. GPT-2 has a bias on the query/key/value projection, so qkv_bias is True.
The small presets train on a laptop CPU in minutes; they keep GPT-2's vocabulary so every model
here shares one tokenizer.
"""
from pathlib import Path

from .errors import UserError
from .files import read_json

REQUIRED_KEYS = ("vocab_size", "context_size", "embedding_dim", "num_heads", "num_layers", "drop_rate", "qkv_bias")

TOKENIZER_VOCABULARY = 50257  # every model here reads GPT-2's tokens
_GPT2 = {"vocab_size": TOKENIZER_VOCABULARY, "context_size": 1024, "drop_rate": 0.1, "qkv_bias": True}

GPT_CONFIGS = {
    "124M": {**_GPT2, "embedding_dim": 768, "num_heads": 12, "num_layers": 12},
    "355M": {**_GPT2, "embedding_dim": 1024, "num_heads": 16, "num_layers": 24},
    "774M": {**_GPT2, "embedding_dim": 1280, "num_heads": 20, "num_layers": 36},
    "1558M": {**_GPT2, "embedding_dim": 1600, "num_heads": 25, "num_layers": 48},
    # CPU presets: "tiny" is what `python train.py` trains by default, "small" a step up. Tiny's shape won
    # a race on 2 CPU cores (README, "Pretraining"): at this size most of a step is the 50,257-way softmax,
    # so a wider or deeper model learns little more per step and takes fewer steps in the same time.
    "tiny": {**_GPT2, "context_size": 256, "embedding_dim": 256, "num_heads": 4, "num_layers": 4, "drop_rate": 0.0},
    "small": {**_GPT2, "context_size": 512, "embedding_dim": 384, "num_heads": 6, "num_layers": 6, "drop_rate": 0.1},
}


MAX_PARAMETERS = 2**40  # about a trillion: 4 TB of float32, a number off by a few digits


class ConfigError(UserError, ValueError):
    """A model configuration that cannot build a GPTModel."""


def validate_config(config):
    """Check that a config dict describes a buildable model; return it unchanged."""
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise ConfigError(f"the model config lacks {', '.join(missing)} (a config needs {', '.join(REQUIRED_KEYS)})")
    for key in ("vocab_size", "context_size", "embedding_dim", "num_heads", "num_layers"):
        if not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] < 1:
            raise ConfigError(f"the model config's {key} must be a positive integer, not {config[key]!r}")
    if config["embedding_dim"] % config["num_heads"]:
        raise ConfigError(
            f"embedding_dim ({config['embedding_dim']}) must be divisible by num_heads ({config['num_heads']}): "
            "each head gets embedding_dim / num_heads dimensions"
        )
    dim = config["embedding_dim"]
    parameters = (config["vocab_size"] + config["context_size"]) * dim + config["num_layers"] * 12 * dim * dim
    if parameters > MAX_PARAMETERS:
        raise ConfigError(f"the model config describes about {parameters:.3g} parameters, more than any machine holds "
                          f"(the limit is {MAX_PARAMETERS:.3g}); check embedding_dim, num_layers, vocab_size and context_size")
    drop_rate = config["drop_rate"]
    if not isinstance(drop_rate, (int, float)) or isinstance(drop_rate, bool) or not 0.0 <= drop_rate < 1.0:
        raise ConfigError(f"drop_rate must be a number in [0, 1), not {drop_rate!r}")
    if not isinstance(config["qkv_bias"], bool):
        raise ConfigError(f"qkv_bias must be true or false, not {config['qkv_bias']!r}")
    num_classes = config.get("num_classes")
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2):
        raise ConfigError(f"num_classes must be an integer >= 2, not {num_classes!r}")
    return config


def resolve_config(name_or_path):
    """A GPT_CONFIGS name, or the path of a JSON file holding a config dict (missing keys come from "124M")."""
    if name_or_path in GPT_CONFIGS:
        return dict(GPT_CONFIGS[name_or_path])
    path = Path(name_or_path)
    if path.suffix != ".json":
        raise ConfigError(f"unknown config {name_or_path!r}: use one of {', '.join(GPT_CONFIGS)} or a .json file")
    what = f"a model config: a JSON object with keys such as {', '.join(REQUIRED_KEYS)}"
    overrides = read_json(path, what)
    if not isinstance(overrides, dict):
        raise ConfigError(f"config file {path} holds a JSON {type(overrides).__name__}; it must be {what}")
    config = {**GPT_CONFIGS["124M"], **overrides}
    try:
        validate_config(config)
    except ConfigError as error:
        raise ConfigError(f"config file {path}: {error}") from None
    if config["vocab_size"] < TOKENIZER_VOCABULARY:
        raise ConfigError(f"config file {path}: vocab_size must be at least {TOKENIZER_VOCABULARY}, the GPT-2 "
                          f"tokenizer's, not {config['vocab_size']}")
    return config

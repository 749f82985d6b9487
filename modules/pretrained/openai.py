"""OpenAI's GPT-2 as published: TensorFlow 1 checkpoints, downloaded and read into GPTModel.

TensorFlow is imported only inside load_gpt2, so importing this file (or any script that can load
OpenAI's weights) does not pay for it.
"""
import os
import shutil
from pathlib import Path

import torch

from ..caches import cache_paths
from ..download import DOWNLOAD_ELSEWHERE, download_file
from ..errors import UserError
from ..files import read_json, write_error

from .build import build_gpt2, config_from

BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
MODEL_SIZES = ("124M", "355M", "774M", "1558M")
# What OpenAI's download script fetches for each size: the TensorFlow checkpoint, its hyperparameters
# and the BPE vocabulary.
FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001", "model.ckpt.index",
         "model.ckpt.meta", "vocab.bpe")
# hparams.json's keys, each with our config key.
OPENAI_CONFIG_KEYS = {"n_vocab": "vocab_size", "n_ctx": "context_size", "n_embd": "embedding_dim",
                      "n_head": "num_heads", "n_layer": "num_layers"}


def download_gpt2(model_size, models_dir="gpt2", base_url=BASE_URL, **download_options):
    """Fetch OpenAI's files for `model_size` into models_dir/model_size (files already there are kept) and
    return that folder; where it cannot be written, the files go to the same path in the user's cache folder
    (modules/caches.py), and that folder is returned."""
    if model_size not in MODEL_SIZES:
        raise UserError(f"unknown GPT-2 size {model_size!r}; OpenAI published {', '.join(MODEL_SIZES)}")
    model_dir = Path(models_dir) / model_size
    url = f"{base_url}/{model_size}"
    hint = (f"Without network access, download {', '.join(FILES)} from {url}/ on another machine and put them "
            f"in {model_dir}/ (or pass --from-hf with a Hugging Face copy of GPT-2).")
    locations = [download_file(f"{url}/{name}", model_dir / name, hint=hint, **download_options) for name in FILES]
    folders = {location.parent for location in locations}
    if len(folders) == 1:
        return folders.pop()
    # Some files were in models_dir already and the rest went to the user's cache folder: gather them there.
    cache_folder = cache_paths(model_dir)[1]
    for location in locations:
        if location.parent != cache_folder:
            try:
                shutil.copy2(location, cache_folder / location.name)
            except OSError as error:
                raise write_error(cache_folder / location.name, error, DOWNLOAD_ELSEWHERE) from None
    return cache_folder


def load_gpt2(model_dir):
    """GPTModel (eval mode, CPU, float32) holding an OpenAI GPT-2 checkpoint directory's weights.

    The directory holds hparams.json, `checkpoint` and model.ckpt.* as OpenAI published them; any
    size works, the config comes from hparams.json."""
    model_dir = Path(model_dir)
    hparams_path = model_dir / "hparams.json"
    what = f"the hyperparameters of an OpenAI GPT-2 checkpoint, a JSON object. {_how_to_get(model_dir)}"
    hparams = read_json(hparams_path, what, expect=dict)
    config = config_from(hparams, OPENAI_CONFIG_KEYS, hparams_path)
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
        return build_gpt2(config, variables, lambda name: torch.from_numpy(reader.get_tensor(name)), hparams_path)
    except read_errors as error:
        raise UserError(f"could not read the checkpoint {prefix}: {getattr(error, 'message', error)}; "
                        f"the files may be incomplete. {_how_to_get(model_dir)}") from None


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

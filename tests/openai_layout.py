"""Write GPT-2 checkpoints exactly as OpenAI published them, for tests and benchmarks.

OpenAI's model directories (https://openaipublic.blob.core.windows.net/gpt-2/models/124M/ ...) hold a
TensorFlow 1 checkpoint saved by tf.train.Saver: `checkpoint`, `model.ckpt.data-00000-of-00001`,
`model.ckpt.index`, `model.ckpt.meta`, plus `hparams.json` and the BPE files. The variables are
named `model/wte`, `model/h0/attn/c_attn/w`, ... with every linear weight shaped [1, in, out] (a 1x1
convolution). write_openai_checkpoint() reproduces that layout with tf.compat.v1, so the loader is
tested on the real format.
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np

from modules.pretrained import gpt2_name_to_ours, hf_name_to_gpt2

BPE_DIR = Path(__file__).resolve().parents[1] / "modules" / "gpt2_bpe"


def write_openai_checkpoint(gpt2_tensors, hparams, model_dir):
    """Write {"h0/attn/c_attn/w": array, ...} (OpenAI's names without "model/", OpenAI's shapes) and
    hparams {n_vocab, n_ctx, n_embd, n_head, n_layer} to `model_dir` in OpenAI's layout."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        # Each variable starts from a placeholder fed at initialisation: a constant initial value would
        # copy every weight into the graph (and into model.ckpt.meta), which is slow for 124M.
        feeds, variables = {}, []
        for name, array in gpt2_tensors.items():
            array = np.asarray(array, dtype=np.float32)
            placeholder = tf.compat.v1.placeholder(tf.float32, array.shape)
            variables.append(tf.compat.v1.Variable(placeholder, name=f"model/{name}"))
            feeds[placeholder] = array
        saver = tf.compat.v1.train.Saver(variables, save_relative_paths=True)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run([variable.initializer for variable in variables], feed_dict=feeds)
            saver.save(session, str(model_dir / "model.ckpt"))
    (model_dir / "hparams.json").write_text(json.dumps(hparams, indent=2))
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(BPE_DIR / name, model_dir / name)
    return model_dir


def gpt2_tensors_from_transformers(hf_model):
    """{OpenAI name: float32 array in OpenAI's shape} from a transformers GPT2LMHeadModel (or GPT2Model).

    Hugging Face's Conv1D weights are [in, out]; OpenAI's carry a leading 1. The attention-mask
    buffers and the tied lm_head are not weights of OpenAI's checkpoint and are left out."""
    tensors = {}
    for hf_name, tensor in hf_model.state_dict().items():
        name = hf_name_to_gpt2(hf_name)
        if gpt2_name_to_ours(name) is None:
            continue
        array = tensor.detach().cpu().float().numpy()
        tensors[name] = array[None] if name.endswith("/w") else array
    return tensors


def hparams_from_transformers(hf_config):
    """OpenAI's hparams.json for a transformers GPT2Config."""
    return {"n_vocab": hf_config.vocab_size, "n_ctx": hf_config.n_positions, "n_embd": hf_config.n_embd,
            "n_head": hf_config.n_head, "n_layer": hf_config.n_layer}

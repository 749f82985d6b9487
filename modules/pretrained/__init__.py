"""Pretrained GPT-2 weights into our GPTModel: OpenAI's TensorFlow checkpoints and Hugging Face's copies.

    from modules.pretrained import download_gpt2, load_gpt2, load_gpt2_from_hf

    model = load_gpt2(download_gpt2("124M"))       # gpt2/124M/, fetched once; eval mode, CPU, float32
    model = load_gpt2_from_hf("path/to/gpt2-snapshot")

Both loaders read the file that describes the model (hparams.json or config.json), check the shape of
every stored weight against it before reading any, then build the model straight from the stored tensors
(no random initialisation first). get_gpt_weights.py is the command line over this package.

- names.py: OpenAI's, Hugging Face's and our parameter names, and the conversion to our state dict;
- build.py: what both loaders share (the config, the shape checks, building the model);
- openai.py: downloading OpenAI's files and reading them with TensorFlow (imported only then);
- huggingface.py: reading safetensors or pytorch_model.bin, without TensorFlow.
"""
from .huggingface import load_gpt2_from_hf
from .names import convert_gpt2_weights, gpt2_name_to_ours, hf_name_to_gpt2
from .openai import BASE_URL, FILES, MODEL_SIZES, download_gpt2, load_gpt2

__all__ = ["load_gpt2", "load_gpt2_from_hf", "download_gpt2", "MODEL_SIZES", "FILES", "BASE_URL",
           "convert_gpt2_weights", "gpt2_name_to_ours", "hf_name_to_gpt2"]

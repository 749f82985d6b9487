"""Download OpenAI's GPT-2 weights and load them into GPTModel.

    python get_gpt_weights.py --model 124M --save checkpoints/gpt2-124M.pt
    python get_gpt_weights.py --from-hf path/to/gpt2-snapshot --save checkpoints/gpt2-124M.pt

OpenAI published GPT-2 (124M, 355M, 774M and 1558M parameters) as TensorFlow 1 checkpoints. This
script downloads one into gpt2/<size>/ (resuming, retrying, skipping files already there), reads it
one variable at a time with TensorFlow (imported only then, so no other script pays for it), and
builds our GPTModel directly from those tensors. A Hugging Face copy of GPT-2 (config.json plus
model.safetensors or pytorch_model.bin) loads the same way without TensorFlow.

The code lives in modules/pretrained/; from Python: `load_gpt2(download_gpt2("124M"))`,
`load_gpt2_from_hf(directory)`.
"""
import argparse
import time
from pathlib import Path

from modules.checkpoint import save_checkpoint
from modules.device import get_device
from modules.errors import UserError, run_main
from modules.generation import stream_text
# load_gpt2 stays importable from this script, where the original kept its loader (under other names:
# download_and_load_gpt2_weights and load_weights_to_model, which this project does not provide).
from modules.pretrained import BASE_URL, MODEL_SIZES, download_gpt2, load_gpt2, load_gpt2_from_hf
from modules.speed import add_generation_args, decoder_for, prepare_for_generation
from modules.tokenizer import END_OF_TEXT_ID


def print_sample(model, prompt, max_new_tokens, decoder=None):
    """Print a greedy continuation of `prompt`, so the user sees that the weights work (decoder: generate's)."""
    if max_new_tokens <= 0:
        return
    if model.config["vocab_size"] <= END_OF_TEXT_ID:
        print(f"(no sample: the model's {model.config['vocab_size']} tokens are not GPT-2's vocabulary)")
        return
    print(f"Greedy continuation:\n{prompt}", end="", flush=True)
    for piece in stream_text(model, prompt, max_new_tokens, decoder=decoder):
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
    add_generation_args(parser)
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
    model = prepare_for_generation(model.to(device), args.dtype)
    print_sample(model, args.prompt, args.max_new_tokens, decoder_for(model, args.compile))


if __name__ == "__main__":
    run_main(main)

"""What int8 weights (--dtype int8) cost in quality: on the validation tokens of train.py's corpus, the
next-token loss of float32, bfloat16 and int8 weights, and how often each picks float32's most likely
next token.

    python -m benchmarks.int8_quality --checkpoint checkpoints/pretrained.pt   # a model made by train.py
    python -m benchmarks.int8_quality --size 124M                              # GPT-2's shape, random weights
"""
import argparse
import copy
from pathlib import Path

import torch

from benchmarks.tables import machine_description
from modules.checkpoint import load_checkpoint
from modules.datasets.corpus import load_tokens, train_val_windows
from modules.errors import run_main
from modules.loss import next_token_loss
from modules.speed import prepare_for_generation

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "shakespeare"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint (default: random weights of --size)")
    parser.add_argument("--size", default="124M", help="a GPT_CONFIGS name, without --checkpoint (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=CORPUS, help="the corpus (default: train.py's)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="as train.py's (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=16, help="validation windows scored (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    return parser.parse_args()


def float32_model(args):
    if args.checkpoint:
        return load_checkpoint(args.checkpoint).float().eval()
    from modules import GPTModel
    from modules.config import resolve_config

    torch.manual_seed(0)
    return GPTModel(resolve_config(args.size)).eval()


@torch.inference_mode()
def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    reference = float32_model(args)
    context = reference.config["context_size"]
    _, validation = train_val_windows(load_tokens(args.data), context, args.val_fraction, str(args.data))
    step = max(1, len(validation) // args.windows)
    windows = [validation[index] for index in range(0, len(validation), step)][:args.windows]
    inputs = torch.stack([window[0] for window in windows])
    targets = torch.stack([window[1] for window in windows])
    logits = {"float32": reference(inputs)}
    for dtype in ("bfloat16", "int8"):
        logits[dtype] = prepare_for_generation(copy.deepcopy(reference), dtype)(inputs).float()
    best = logits["float32"].argmax(-1)
    what = args.checkpoint or f"GPT-2 {args.size}, random weights (seed 0)"
    print(f"{what}; {len(windows)} validation windows of {context} tokens of {args.data}. "
          f"{machine_description(torch.device('cpu'), args.threads)}\n")
    print("| weights | validation loss | next token = float32's |\n| --- | --- | --- |")
    for dtype, values in logits.items():
        agreement = (values.argmax(-1) == best).float().mean().item()
        print(f"| {dtype} | {next_token_loss(values, targets).item():.4f} | {agreement:.2%} |")


if __name__ == "__main__":
    run_main(main)

"""Pretrain a GPT on plain text (by default the bundled Shakespeare corpus).

    python train.py                                   # ~5 minutes on 2 CPU cores
    python train.py --data my_texts/ --init 124M      # continue pretraining GPT-2 on your own text
    torchrun --nproc_per_node 4 train.py --config 124M --batch-size 64
"""
import argparse
from pathlib import Path

import torch

from modules.datasets.corpus import load_tokens, train_val_windows
from modules.errors import UserError, run_main
from modules.generation import generate
from modules.tokenizer import END_OF_TEXT_ID, encode, get_tokenizer
from modules.training import (TrainingTask, add_init_args, add_training_args, parameter_summary, starting_model, train,
                              training_run)

DEFAULT_CORPUS = Path(__file__).parent / "corpus" / "shakespeare"


class PretrainingTask(TrainingTask):
    """Next-token prediction on windows of the corpus; prints a greedy continuation at each evaluation."""

    def __init__(self, train_set, val_set, sample_prompt, sample_tokens):
        super().__init__(train_set, val_set)
        self.sample_prompt, self.sample_tokens = sample_prompt, sample_tokens

    def sample(self, model):
        if not self.sample_tokens:
            return None
        device = next(model.parameters()).device
        input_ids = torch.tensor([encode(self.sample_prompt) or [END_OF_TEXT_ID]], device=device)
        output = generate(model, input_ids, self.sample_tokens)
        return get_tokenizer().decode(output[0, input_ids.shape[1]:].tolist())

    def checkpoint_metadata(self):
        return {"context_size": self.train_set.context_size}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_CORPUS,
                        help="a .txt file, a folder of .txt files, or a .bin of uint16 GPT-2 tokens (default: the bundled corpus)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of the tokens held out for validation (default: %(default)s)")
    add_init_args(parser, init="scratch")
    parser.add_argument("--context-size", type=int, default=None,
                        help="tokens per training window (default and maximum: the model's context size)")
    parser.add_argument("--sample-prompt", default="To be, or not to be", help="prompt of the sample shown at each evaluation")
    parser.add_argument("--sample-tokens", type=int, default=40, help="tokens of that sample, 0 for none (default: %(default)s)")
    add_training_args(parser, epochs=1, batch_size=8, lr=1e-3, eval_interval=25, eval_batches=8,
                      out="checkpoints/pretrained.pt")
    return parser.parse_args()


def main():
    args = parse_args()
    with training_run(args) as (settings, process):
        model = starting_model(args, process)
        context_size = args.context_size or model.config["context_size"]
        if not 1 < context_size <= model.config["context_size"]:
            raise UserError(f"--context-size must be between 2 and the model's {model.config['context_size']}")
        train_set, val_set = train_val_windows(load_tokens(args.data), context_size, args.val_fraction)
        if process.is_main:
            print(f"{len(train_set):,} training and {len(val_set):,} validation windows of {context_size} tokens; "
                  f"{parameter_summary(model)} on {process.device}")
        task = PretrainingTask(train_set, val_set, args.sample_prompt, args.sample_tokens)
        trainer = train(model, task, settings, process)
        if process.is_main:
            metrics = trainer.final_metrics()
            print(f"done: train loss {metrics['train_loss']:.3f}, val loss {metrics['val_loss']:.3f} "
                  f"(best {metrics['best_val_loss']:.3f}); best model {settings.out}, plot and metrics beside it")


if __name__ == "__main__":
    run_main(main)

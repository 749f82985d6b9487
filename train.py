"""Pretrain a GPT on plain text (by default the bundled Shakespeare corpus).

    python train.py                                   # about 3 minutes on 2 CPU cores
    python train.py --data my_texts/ --init 124M      # continue pretraining GPT-2 on your own text
    torchrun --nproc_per_node 4 train.py --config 124M --batch-size 64
"""
import argparse
import math
from pathlib import Path

import torch

from modules.datasets.corpus import load_tokens, train_val_windows
from modules.errors import check_flag, run_main
from modules.generation import generate
from modules.loss import next_token_loss
from modules.tokenizer import END_OF_TEXT_ID, encode, get_tokenizer, token_byte_lengths
from modules.training.loop import train
from modules.training.parallel import training_run
from modules.training.reports import final_metrics
from modules.training.settings import add_training_args
from modules.training.starting_model import add_init_args, parameter_summary, starting_model
from modules.training.task import TrainingTask

DEFAULT_CORPUS = Path(__file__).parent / "corpus" / "shakespeare"


class PretrainingTask(TrainingTask):
    """Next-token prediction on windows of the corpus, measured in bits per byte too, with a sampled
    continuation of a prompt at each evaluation."""

    metric_names = ("loss", "bpb")

    def __init__(self, train_set, val_set, sampling):
        super().__init__(train_set, val_set)
        self.sampling = sampling

    def metrics(self, model, batch):
        """The loss (nats per token) and bits per byte: the loss's bits over the bytes of text the targets
        stand for. A model's bits per byte does not depend on its tokenizer, so it compares with
        character-level models (nanoGPT's Shakespeare) and models with other vocabularies."""
        targets = batch["targets"]
        loss = next_token_loss(model(batch["input_ids"]), targets).item()
        text_bytes = token_byte_lengths()[targets.cpu()].sum().item()
        return {"loss": (loss * len(targets), len(targets)), "bpb": (loss * targets.numel() / math.log(2), text_bytes)}

    def sample(self, model):
        """The prompt's continuation, sampled with the same seed at every evaluation (as nanoGPT's sample.py
        samples: temperature 0.8, top-k 200), so that the samples differ only by what the model learned."""
        if not self.sampling["tokens"]:
            return None
        device = next(model.parameters()).device
        input_ids = torch.tensor([encode(self.sampling["prompt"]) or [END_OF_TEXT_ID]], device=device)
        generator = torch.Generator(device=device).manual_seed(self.sampling["seed"])
        output = generate(model, input_ids, self.sampling["tokens"], self.sampling["temperature"],
                          self.sampling["top_k"], generator=generator)
        return get_tokenizer().decode(output[0].tolist())

    def checkpoint_metadata(self):
        return {"context_size": self.train_set.context_size}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_CORPUS,
                        help="a .txt file, a folder of .txt files, or a .bin of uint16 GPT-2 tokens (default: the bundled corpus)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of the tokens held out for validation (default: %(default)s)")
    add_init_args(parser, init="scratch")
    parser.add_argument("--context-size", type=int, default=None,
                        help="tokens per training window (default and maximum: the model's context size)")
    sampling = parser.add_argument_group("the sample shown at each evaluation")
    sampling.add_argument("--sample-prompt", default="\n", help="its prompt (default: a new line, where a play's next "
                                                                 "speaker or stage direction starts)")
    sampling.add_argument("--sample-tokens", type=int, default=200, help="its length, 0 for none (default: %(default)s)")
    sampling.add_argument("--sample-temperature", type=float, default=0.8, help="0 is greedy (default: %(default)s)")
    sampling.add_argument("--sample-top-k", type=int, default=200, help="(default: %(default)s)")
    sampling.add_argument("--sample-seed", type=int, default=1337, help="(default: %(default)s)")
    add_training_args(parser, epochs=10, max_time=160, batch_size=4, lr=1e-3, eval_interval=200, eval_batches=8,
                      out="checkpoints/pretrained.pt")
    return parser.parse_args(argv)


def sampling_settings(args):
    check_flag("sample_tokens", args.sample_tokens, lambda tokens: tokens >= 0, ">= 0")
    check_flag("sample_temperature", args.sample_temperature, lambda temperature: temperature >= 0, ">= 0 (0 is greedy)")
    check_flag("sample_top_k", args.sample_top_k, lambda top_k: top_k >= 1, ">= 1")
    return {"prompt": args.sample_prompt, "tokens": args.sample_tokens, "temperature": args.sample_temperature,
            "top_k": args.sample_top_k, "seed": args.sample_seed}


def main(argv=None):
    args = parse_args(argv)
    sampling = sampling_settings(args)
    with training_run(args) as (settings, process):
        model = starting_model(args, process)
        context_size = args.context_size or model.config["context_size"]
        check_flag("context_size", context_size, lambda size: 1 < size <= model.config["context_size"],
                   f"between 2 and the model's {model.config['context_size']}")
        train_set, val_set = train_val_windows(load_tokens(args.data), context_size, args.val_fraction, args.data)
        if process.is_main:
            print(f"{len(train_set):,} training and {len(val_set):,} validation windows of {context_size} tokens; "
                  f"{parameter_summary(model)} on {process.device}")
        trainer = train(model, PretrainingTask(train_set, val_set, sampling), settings, process)
        if process.is_main:
            metrics = final_metrics(trainer.progress)
            print(f"done: validation loss {metrics['val_loss']:.3f}, {metrics['val_bpb']:.3f} bits per byte "
                  f"(training {metrics['train_loss']:.3f}, {metrics['train_bpb']:.3f}); best model {settings.out}, "
                  "plot and metrics beside it")


if __name__ == "__main__":
    run_main(main)

"""Fine-tune a GPT into an SMS spam classifier (UCI's SMS Spam Collection), or classify with one.

    python fine_tune_classifier.py                                  # GPT-2 124M, 5 epochs; downloads data and weights once
    python fine_tune_classifier.py --init checkpoints/pretrained.pt --train-all --lr 5e-4   # from a train.py model
    python fine_tune_classifier.py --init scratch --config tiny --lr 1e-3
    python fine_tune_classifier.py --lora-rank 16 --lr 1e-3         # LoRA adapters instead of the last block
    python fine_tune_classifier.py --classify "You won a prize! Call now"
    python fine_tune_classifier.py --preset original                # the original's experiment: GPT-2 774M ...

The output head becomes a 2-class Linear that reads each message's last real token. By default only
the last transformer block, the final LayerNorm and the head train, as in the original project
(everything trains with --init scratch or --train-all).
"""
import argparse
from pathlib import Path

import torch
from torch.nn import functional as F

from modules.checkpoint import open_checkpoint
from modules.classification import (
    classifier_from_lm, classifier_settings, classify, encode_for_classification, last_token_logits,
)
from modules.device import get_device
from modules.download import add_download_args
from modules.errors import UserError, check_flag, run_main
from modules.lora import add_lora_args, lora_from_flags
from modules.datasets.sms_spam import (LABEL_NAMES, QUOTINGS, SMS_SPAM_URL, as_samples, balance, fetch_sms_spam,
                                      read_messages, split, split_paths, write_splits)
from modules.presets import Preset, parse_with_presets
from modules.tokenizer import encode
from modules.training.loop import train
from modules.training.parallel import training_run
from modules.training.settings import add_training_args
from modules.training.starting_model import add_init_args, parameter_summary, starting_model
from modules.training.task import TrainingTask


class ClassifierTask(TrainingTask):
    """Cross-entropy on the logits of each message's last real token; accuracy as a second metric."""

    kind = "classifier"
    metric_names = ("loss", "accuracy")

    def __init__(self, train_set, val_set, max_length):
        super().__init__(train_set, val_set)
        self.max_length = max_length

    def collate(self, samples):
        texts, labels = zip(*samples)
        input_ids, lengths = encode_for_classification(texts, self.max_length)
        return {"input_ids": input_ids, "lengths": lengths, "labels": torch.tensor(labels)}

    loss_function = staticmethod(F.cross_entropy)

    def logits_and_targets(self, model, batch):
        return last_token_logits(model, batch["input_ids"], batch["lengths"]).float(), batch["labels"]

    def metrics(self, model, batch):
        logits, labels = self.logits_and_targets(model, batch)
        size = len(labels)
        return {"loss": (F.cross_entropy(logits, labels, reduction="sum").item(), size),
                "accuracy": ((logits.argmax(dim=-1) == labels).sum().item(), size)}

    def longest_batch_tokens(self):
        return self.max_length  # a batch is as wide as its longest message, at most max_length tokens

    def num_tokens(self, batch):
        return int(batch["lengths"].sum())

    def checkpoint_metadata(self):
        return {"label_names": list(LABEL_NAMES), "max_length": self.max_length}


# The original project's experiment (its fine_tune_classifier.py, lines cited), flag by flag.
ORIGINAL = Preset({
    # Balanced and split 70/10/20 as here (lines 75-89); the last block, the final norm and a new head
    # train, as here by default (lines 256-265).
    "quoting": "pandas",                   # pd.read_csv(sep="\t", header=None) (line 72)
    "seed": 123,                           # random_state=123 to balance and to shuffle (lines 77, 82)
    "init": "774M",                        # MyGPTModel(GPT_774_CONFIG) (line 245)
    "drop_rate": 0.1,                      # GPT_774_CONFIG's (config.py line 27), in train mode (line 157)
    "batch_size": 8,                       # batch_size = 8 (line 222)
    "lr": 5e-5, "weight_decay": 0.1,       # AdamW(lr=5e-5, weight_decay=0.1) (line 280)
    "epochs": 5,                           # num_epochs = 5 (line 281)
    "eval_interval": 50, "eval_batches": 5,  # eval_freq=50, eval_iter=5 (line 284)
    "warmup_steps": 0, "lr_schedule": "constant", "grad_clip": 0.0,  # constant lr, no clipping (train_model, lines 148-188)
    "dtype": "float32",                    # no autocast
}, note="Unlike the original, each message is classified at its last real token: the original read the last "
        "position of the padded batch (line 118): padding, for all but the longest message of the split.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = add_download_args(parser, "a local data set: UCI's SMSSpamCollection (label<TAB>text lines) or a .csv with "
                                     "label and text columns, such as the original's train.csv (labels 0 and 1) "
                                     "(default: download UCI's zip into --data-dir)",
                             SMS_SPAM_URL, "the SMS Spam Collection")
    data.add_argument("--quoting", choices=QUOTINGS, default="none",
                      help="quotes in UCI's tab-separated file: none keeps each \" in its message (5,574 messages); "
                           "pandas reads them as the original did, with pandas.read_csv: 53 messages lose quotes and "
                           "one takes in the two lines after it (5,572 messages) (default: %(default)s)")
    data.add_argument("--no-balance", action="store_true",
                      help="keep every message (by default ham is undersampled to the number of spam messages)")
    data.add_argument("--max-length", type=int, default=None,
                      help="tokens read per message; longer ones are truncated (default: the longest training "
                           "message, at most the model's context)")
    model = add_init_args(parser, init="124M")
    model.add_argument("--drop-rate", type=float, default=0.0, help="dropout while fine-tuning (default: %(default)s)")
    model.add_argument("--train-all", action="store_true",
                       help="train every weight (default with --init scratch; otherwise only the last block, "
                            "the final norm and the head train)")
    add_lora_args(parser)
    use = parser.add_argument_group("classifying with a trained model")
    use.add_argument("--classify", nargs="+", metavar="TEXT", help="print the label and probability of each TEXT, then exit")
    use.add_argument("--checkpoint", type=Path, default=None, help="the classifier checkpoint for --classify (default: --out)")
    # The loss is over two classes, not a vocabulary: compiling it would cost a compile and fuse nothing large.
    add_training_args(parser, epochs=5, batch_size=8, lr=5e-5, eval_interval=None, eval_batches=10,
                      weight_decay=0.1, compile_loss=False, out="checkpoints/classifier.pt")
    return parse_with_presets(parser, {"original": ORIGINAL}, argv)


def load_splits(args, process):
    """Training, validation and test DataFrames, written as CSVs beside the checkpoint."""
    with process.main_process_first():
        messages = read_messages(args.data or fetch_sms_spam(args.data_dir, args.data_url), args.quoting)
    if not args.no_balance:
        messages = balance(messages, args.seed)
    splits = split(messages, args.seed)
    if process.is_main:
        write_splits(splits, args.out)
    return splits


def as_classifier(lm, args):
    """--init's weights with a 2-class head, and the parameters chosen to train frozen or not."""
    check_flag("drop_rate", args.drop_rate, lambda rate: 0 <= rate < 1, "in [0, 1)")
    if args.train_all and args.lora_rank:
        raise UserError("--train-all and --lora-rank exclude each other: LoRA trains adapters beside frozen weights")
    model = classifier_from_lm(lm, len(LABEL_NAMES), args.drop_rate)
    if lora_from_flags(model, args.lora_rank, args.lora_alpha):
        model.out_head.requires_grad_(True)  # the new head is random: it must train in full
    elif not args.train_all and args.init != "scratch":  # random weights hold nothing worth keeping frozen
        model.requires_grad_(False)
        for module in (model.blocks[-1], model.final_norm, model.out_head):
            module.requires_grad_(True)
    return model


def choose_max_length(requested, train_texts, context_size):
    if requested is None:
        return min(context_size, max(len(encode(text)) for text in train_texts))
    if not 1 <= requested <= context_size:
        raise UserError(f"--max-length must be between 1 and the model's context size {context_size}, not {requested}")
    return requested


def fine_tune(args):
    with training_run(args) as (settings, process):
        train_messages, val_messages, test_messages = load_splits(args, process)
        model = as_classifier(starting_model(args, process), args)
        max_length = choose_max_length(args.max_length, train_messages["text"], model.config["context_size"])
        task = ClassifierTask(as_samples(train_messages), as_samples(val_messages), max_length)
        if process.is_main:
            print(f"{len(train_messages)} training, {len(val_messages)} validation, {len(test_messages)} test messages "
                  f"(splits in {split_paths(args.out)['train'].parent}); {max_length} tokens at most per message; "
                  f"{parameter_summary(model)} on {process.device}")
        trainer = train(model, task, settings, process)
        trainer.load_best()
        splits = {"train": task.train_set, "val": task.val_set, "test": as_samples(test_messages)}
        final = {f"{split_name}_{name}": value for split_name, dataset in splits.items()
                 for name, value in trainer.evaluate(dataset).items()}
        if process.is_main:
            trainer.write_reports(final)
            print(" | ".join(f"{split_name} accuracy {final[f'{split_name}_accuracy']:.2%}" for split_name in splits)
                  + f"; best model {settings.out}, metrics, plot and splits beside it")


def classify_texts(args):
    classifier = open_checkpoint(args.checkpoint or args.out, get_device(args.device), kinds=("classifier",))
    for text in args.classify:
        label, probability = classify(classifier.model, text, **classifier_settings(classifier.metadata))
        print(f"{label} ({probability:.1%}): {text}")


def main(argv=None):
    args = parse_args(argv)
    if args.classify:
        classify_texts(args)
    else:
        fine_tune(args)


if __name__ == "__main__":
    run_main(main)

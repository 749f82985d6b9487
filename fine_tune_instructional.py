"""Instruction tuning: teach GPT-2 to follow instructions on Stanford Alpaca.

    python fine_tune_instructional.py                      # GPT-2 124M on the first 10,000 Alpaca records
    python fine_tune_instructional.py --preset original    # the original project's experiment: GPT-2 774M ...
    python fine_tune_instructional.py --data my_data.jsonl --init 355M --mask-prompt
    python fine_tune_instructional.py --lora-rank 16 --lora-alpha 32   # LoRA adapters on a frozen model
    torchrun --nproc_per_node 4 fine_tune_instructional.py --batch-size 32

The records are shuffled with --seed and split 80/10/10 into training, validation and test sets
(--split-order file keeps the file's order, as the original did); the checkpoint records how, so
`python evaluate_responses.py` answers the same test set and `python gpt_eval.py` has an LLM judge
score the answers.
"""
import argparse

from modules.datasets.instructions import (ALPACA_URL, SPLIT_ORDERS, InstructionDataset, collate_instructions,
                                           fetch_alpaca, file_sha256, generate_responses, load_instruction_data,
                                           split_instruction_data)
from modules.download import add_download_args
from modules.errors import check_flag, run_main
from modules.lora import add_lora_args, lora_from_flags
from modules.loss import IGNORE_INDEX
from modules.presets import Preset, parse_with_presets
from modules.training.loop import train
from modules.training.parallel import training_run
from modules.training.settings import add_training_args
from modules.training.starting_model import add_init_args, parameter_summary, starting_model
from modules.training.task import TrainingTask


class InstructionTask(TrainingTask):
    """Next-token prediction on Alpaca-formatted examples; prints the model's greedy answer to the
    first validation instruction at each evaluation."""

    kind = "instruct"

    def __init__(self, train_set, val_set, max_length, mask_prompt, sample_tokens, metadata):
        super().__init__(train_set, val_set)
        self.max_length, self.mask_prompt, self.sample_tokens = max_length, mask_prompt, sample_tokens
        self.metadata = metadata

    def collate(self, samples):
        input_ids, targets = collate_instructions(samples, self.max_length, self.mask_prompt)
        return {"input_ids": input_ids, "targets": targets}

    def longest_batch_tokens(self):
        # A batch is as wide as its longest example (cut at max_length).
        return self.collate([max(self.train_set, key=lambda sample: len(sample[0]))])["input_ids"].shape[1]

    def num_tokens(self, batch):
        return int((batch["targets"] != IGNORE_INDEX).sum())

    def sample(self, model):
        if not self.sample_tokens:
            return None
        entry = self.val_set.entries[0]
        return f"{entry['instruction']} => {generate_responses(model, [entry], self.sample_tokens)[0]}"

    def checkpoint_metadata(self):
        return self.metadata


# The original project's experiment (its fine_tune_instructional.py, lines cited), flag by flag.
ORIGINAL = Preset({
    "init": "774M",                        # MyGPTModel(GPT_774_CONFIG) with OpenAI's 774M weights (lines 49, 54)
    "limit": 10_000,                       # alpaca_data_10k.json, 10,000 Alpaca records (line 17)
    "split_order": "file",                 # not shuffled: 80% train, 10% test, 10% validation (lines 22-28)
    "val_fraction": 0.1, "test_fraction": 0.1,
    # The loss covers prompt and response (utils.py, collate_batch), as here without --mask-prompt.
    "batch_size": 2,                       # prepare_dataset(2) (line 48)
    "lr": 2e-5, "weight_decay": 0.1,       # AdamW(lr=2e-5, weight_decay=0.1) (line 75)
    "epochs": 5,                           # num_epochs = 5 (line 76)
    "eval_interval": 50, "eval_batches": 50,  # eval_freq=50, eval_iter=50 (line 78)
    "warmup_steps": 0, "lr_schedule": "constant", "grad_clip": 0.0,  # constant lr, no clipping (train.py, train_model)
    "dtype": "float32",                    # no autocast
}, note="Unlike the original, the validation loss is measured on the validation records: the original's "
        "val_loader read the training set (its line 38), so its reported validation loss is a training loss.")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = add_download_args(parser, "a JSON list or JSONL file of instruction/input/output records, such as the "
                                     "original's alpaca_data_10k.json (default: Stanford Alpaca, downloaded into "
                                     "--data-dir)", ALPACA_URL, "Alpaca")
    data.add_argument("--limit", type=int, default=10000,
                      help="use the first N records, 0 for all (default: %(default)s, the size of the original's "
                           "alpaca_data_10k.json)")
    data.add_argument("--val-fraction", type=float, default=0.1, help="share of the records for validation (default: %(default)s)")
    data.add_argument("--test-fraction", type=float, default=0.1,
                      help="share of the records held out for evaluate_responses.py (default: %(default)s)")
    data.add_argument("--split-order", choices=SPLIT_ORDERS, default="shuffled",
                      help="shuffled: shuffle with --seed, then training, validation, test; file: the file's order, "
                           "cut as the original did: training first, then test, then validation (default: %(default)s)")
    data.add_argument("--max-length", type=int, default=None,
                      help="cut examples to this many tokens (default and maximum: the model's context size)")
    data.add_argument("--mask-prompt", action="store_true", help="train on the response tokens only, not on the prompt")
    model = add_init_args(parser, init="124M")
    model.add_argument("--sample-tokens", type=int, default=64,
                       help="tokens of the answer shown at each evaluation, 0 for none (default: %(default)s)")
    add_lora_args(parser)
    add_training_args(parser, epochs=2, batch_size=8, lr=5e-5, eval_interval=100, eval_batches=5,
                      out="checkpoints/instruct.pt")
    return parse_with_presets(parser, {"original": ORIGINAL})


def instruction_data_path(args, process):
    """--data, or Alpaca in --data-dir, downloaded once by the main process while the others wait."""
    if args.data is not None:
        return args.data
    path = args.data_dir / "alpaca_data.json"
    with process.main_process_first():
        return fetch_alpaca(path, args.data_url)


def main():
    args = parse_args()
    with training_run(args) as (settings, process):
        data_path = instruction_data_path(args, process)
        entries = load_instruction_data(data_path, limit=args.limit or None)
        fractions = (1.0 - args.val_fraction - args.test_fraction, args.val_fraction, args.test_fraction)
        train_entries, val_entries, test_entries = split_instruction_data(entries, args.seed, fractions, args.split_order)
        model = starting_model(args, process)
        context_size = model.config["context_size"]
        max_length = args.max_length or context_size
        check_flag("max_length", max_length, lambda length: 1 < length <= context_size,
                   f"between 2 and the model's context size {context_size}")
        lora = lora_from_flags(model, args.lora_rank, args.lora_alpha)

        train_set, val_set, test_set = (InstructionDataset(part) for part in (train_entries, val_entries, test_entries))
        # What evaluate_responses.py needs to rebuild the same test set.
        metadata = {
            "data": {"path": str(data_path), "url": None if args.data else args.data_url, "limit": args.limit or None,
                     "seed": args.seed, "fractions": list(fractions), "split_order": args.split_order,
                     "records": len(entries), "sha256": file_sha256(data_path)},
            "max_length": max_length, "mask_prompt": args.mask_prompt,
            "lora": lora,
        }
        task = InstructionTask(train_set, val_set, max_length, args.mask_prompt, args.sample_tokens, metadata)
        if process.is_main:
            cut = sum(len(ids) > max_length for ids, _ in train_set)
            print(f"{len(train_set):,} training, {len(val_set):,} validation and {len(test_set):,} test records "
                  f"from {data_path}; {cut:,} training examples are longer than {max_length} tokens and get cut")
            print(f"{parameter_summary(model)} on {process.device}")

        trainer = train(model, task, settings, process)
        trainer.load_best()
        test_loss = trainer.evaluate(test_set)["loss"]
        if process.is_main:
            metrics = trainer.write_reports({"test_loss": test_loss})
            print(f"done: train loss {metrics['train_loss']:.3f}, val loss {metrics['val_loss']:.3f} "
                  f"(best {metrics['best_val_loss']:.3f}), test loss of the best model {test_loss:.3f}; best model "
                  f"{settings.out}, plot and metrics beside it. Next: python evaluate_responses.py --checkpoint {settings.out}")


if __name__ == "__main__":
    run_main(main)

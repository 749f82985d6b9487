"""The instruction-tuned model answers the held-out test instructions; the answers go to a JSON file
that `python gpt_eval.py` has an LLM judge score.

    python evaluate_responses.py                                    # checkpoints/instruct.pt, 200 answers
    python evaluate_responses.py --num 1000 --batch-size 32 --device cuda
    python evaluate_responses.py --temperature 0.7 --top-p 0.9 --seed 1 --out evaluation/sampled.json
    python evaluate_responses.py --preset original                  # as the original: sampled at temperature 1

The test set is the one fine_tune_instructional.py held out: the checkpoint records the data, the
seed and the split. Answers are greedy unless --temperature is set, so the judged answers are
reproducible. They are written as they come, and a rerun keeps every answer already made with the
same checkpoint and settings: an interrupted run continues where it stopped.
The decoding step is compiled (the first run for a model's shape compiles for about half a minute
per batch shape, later runs find it on disk); --no-compile answers with the eager step.
"""
import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from modules.checkpoint import open_checkpoint
from modules.datasets.instructions import (fetch_alpaca, file_sha256, format_prompt, generate_responses,
                                           load_instruction_data, split_instruction_data)
from modules.device import get_device
from modules.errors import UserError, run_main
from modules.files import exclusive_output
from modules.presets import Preset, parse_with_presets
from modules.results import ResumableResults
from modules.speed import add_generation_args, decoder_for, generation_dtype, prepare_for_generation
from modules.tokenizer import get_tokenizer


# The original project's answers (its evaluate_responses.py, lines cited), flag by flag.
ORIGINAL = Preset({
    "num": 200,                            # test_set[0:200] (line 54)
    "temperature": 1.0,                    # generate_text_v2's default, with no top-k (utils.py line 74)
    "max_new_tokens": 256,                 # max_generated_tokens=256, eos_token_id=50256 (line 58)
}, note="The test set is the one the checkpoint records: with a checkpoint of fine_tune_instructional.py "
        "--preset original, the original's (the 10% of the records after the first 80%).")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/instruct.pt"),
                        help="an 'instruct' checkpoint from fine_tune_instructional.py (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=None,
                        help="the instruction data, when it is no longer where the checkpoint says it was")
    parser.add_argument("--num", type=int, default=200, help="answer the first N test records (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts answered together (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 answers greedily (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    parser.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of tokens reaching this probability")
    parser.add_argument("--seed", type=int, default=123, help="random seed for sampling (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("evaluation/responses.json"),
                        help="the JSON list of answers to write (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    add_generation_args(parser, compile_by_default=True)
    args = parse_with_presets(parser, {"original": ORIGINAL})
    if args.num < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--num, --batch-size and --max-new-tokens must be at least 1")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0 (0 is greedy)")
    return args


def held_out_test_records(checkpoint, metadata, data_override=None):
    """The test set fine_tune_instructional.py held out, rebuilt from what the checkpoint records."""
    info = metadata.get("data")
    if not info:
        raise UserError(f"{checkpoint} does not record the data it was tuned on; make it with fine_tune_instructional.py")
    path = data_override or Path(info["path"])
    if data_override is None and not path.is_file():
        if not info.get("url"):
            raise UserError(f"{path}, the data {checkpoint} was tuned on, is missing; pass its new place with --data PATH")
        path = fetch_alpaca(path, info["url"])
    entries = load_instruction_data(path, info["limit"])
    if file_sha256(path) != info["sha256"]:
        print(f"warning: {path} differs from the file the model was tuned on, so the test set may hold "
              "records it was trained on", file=sys.stderr)
    # Checkpoints older than --split-order were all shuffled.
    return split_instruction_data(entries, info["seed"], info["fractions"], info.get("split_order", "shuffled"))[2]


def record_key(record):
    return record.get("instruction"), record.get("input", ""), record.get("output")


def answer_test_records(model, selected, settings, args, generator, decoder):
    """Answer the `selected` records into --out, keeping the answers made earlier with `settings` and
    saving after each batch (decoder: generate's); returns how many were kept."""
    answers = ResumableResults(
        args.out, selected, key=record_key, what="a JSON list of answers from evaluate_responses.py",
        keeps=lambda record: record.get("generation") == settings and "model_response" in record,
        to_file=lambda results: [result for result in results if result])
    # Prompts of similar length batch with little padding; the longest go first, so a batch too big
    # for the memory fails at once rather than at the end.
    tokenizer = get_tokenizer()
    pending = sorted(answers.pending, key=lambda index: -len(tokenizer.encode_ordinary(format_prompt(selected[index]))))
    answers.save()  # answers made with other settings leave the file now
    with tqdm(total=len(selected), initial=answers.kept, desc="answering", unit="answer") as bar:
        for start in range(0, len(pending), args.batch_size):
            batch = pending[start:start + args.batch_size]
            responses = generate_responses(model, [selected[index] for index in batch], args.max_new_tokens,
                                           args.temperature, args.top_k, args.top_p, generator, decoder)
            answers.record({index: {**selected[index], "model_response": response, "generation": settings}
                            for index, response in zip(batch, responses)})
            bar.update(len(batch))
    return answers.kept


def main():
    args = parse_args()
    device = get_device(args.device)
    tuned = open_checkpoint(args.checkpoint, device, kinds=("instruct",))
    model = prepare_for_generation(tuned.model, args.dtype)
    test = held_out_test_records(args.checkpoint, tuned.metadata, args.data)
    selected = test[:args.num]
    if args.num > len(test):
        print(f"the test set has {len(test)} records; answering all of them")

    sampling = args.temperature > 0
    settings = {"checkpoint": str(args.checkpoint.resolve()), "checkpoint_mtime_ns": args.checkpoint.stat().st_mtime_ns,
                "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                "top_k": args.top_k if sampling else None, "top_p": args.top_p if sampling else None,
                "seed": args.seed if sampling else None,
                "dtype": generation_dtype(model)}
    generator = torch.Generator(device=device).manual_seed(args.seed) if sampling else None
    with exclusive_output(args.out):
        kept = answer_test_records(model, selected, settings, args, generator, decoder_for(model, args.compile))
    print(f"{len(selected)} answers in {args.out} ({kept} kept from an earlier run). "
          f"Next: python gpt_eval.py --data {args.out}")


if __name__ == "__main__":
    run_main(main)

"""Instruction following: the Alpaca prompt (the original project's, byte for byte), the instruction data
(loading, splitting, batching for training) and batched answering, shared by fine-tuning, evaluation and
the app."""
import hashlib
import random

import torch

from ..download import download_file
from ..errors import UserError
from ..files import read_json
from ..generation import generate
from ..loss import IGNORE_INDEX
from ..tokenizer import END_OF_TEXT_ID, get_tokenizer

# The original's wording, which says "a requested task" where Stanford Alpaca's own prompt says "a task".
PROMPT_HEADER = (
    "Below is an instruction that describes a requested task. Write a response that appropriately completes "
    "the request."
)
RESPONSE_MARKER = "\n\n### Response:\n"
ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"


# ----------------------------------------------------------------------------- the prompt
def format_input(entry):
    """The prompt for an {"instruction", "input"} record, up to (not including) the response marker.
    The ### Input section appears only when the record has an input."""
    prompt = f"{PROMPT_HEADER}\n\n### Instruction:\n{entry['instruction']}"
    if entry.get("input"):
        prompt += f"\n\n### Input:\n{entry['input']}"
    return prompt


def format_prompt(entry):
    """What the model sees before it answers: the formatted input and the response marker."""
    return format_input(entry) + RESPONSE_MARKER


# ----------------------------------------------------------------------------- the data
def fetch_alpaca(path, url=ALPACA_URL):
    """Stanford Alpaca's 52,002 records at `path`, downloaded from `url` unless already there; returns
    where they are (the user's cache folder where `path` cannot be written)."""
    return download_file(url, path, hint="With no network, pass a local copy (a JSON list or JSONL of "
                                         "instruction/input/output records) with --data PATH.")


def file_sha256(path):
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def load_instruction_data(path, limit=None):
    """The first `limit` (all if None) records of a JSON list or a JSONL file, as dicts with the keys
    instruction, input ("" when absent) and output."""
    records = read_json(path, "a JSON list or JSON Lines of instruction/input/output records", json_lines=True)
    if not isinstance(records, list):
        raise UserError(f"{path} holds a JSON {type(records).__name__}, not a list of records such as "
                        '[{"instruction": "...", "input": "...", "output": "..."}]')
    if not records:
        raise UserError(f"{path} holds no records")
    return [_checked_record(record, index, path) for index, record in enumerate(records[:limit])]


def _checked_record(record, index, path):
    if not isinstance(record, dict):
        raise UserError(f"record {index} of {path} is a {type(record).__name__}, not an object with instruction/input/output")
    for key in ("instruction", "output"):
        if key not in record:
            raise UserError(f"record {index} of {path} (counting from 0) has no {key!r}; every record needs "
                            "'instruction' and 'output' ('input' is optional)")
    for key in ("instruction", "input", "output"):
        if not isinstance(record.get(key, ""), str):
            raise UserError(f"record {index} of {path}: {key!r} must be a string, not {type(record[key]).__name__}")
    return {"instruction": record["instruction"], "input": record.get("input", ""), "output": record["output"]}


SPLIT_ORDERS = ("shuffled", "file")


def split_instruction_data(entries, seed, fractions=(0.8, 0.1, 0.1), order="shuffled"):
    """(train, val, test) cut from the entries by `fractions` (train, val, test).

    order "shuffled": the entries shuffled with `seed`, then training, validation and test in that
    order, the validation and test sizes rounded. order "file": the entries as they come, cut as the
    original project cut alpaca_data_10k.json: training first, then test, then validation (the rest),
    the training and test sizes rounded down."""
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise UserError(f"the train/val/test fractions {tuple(fractions)} must be three positive numbers summing to 1")
    if order not in SPLIT_ORDERS:
        raise UserError(f"the split order must be one of {', '.join(SPLIT_ORDERS)}, not {order!r}")
    entries = list(entries)
    total = len(entries)
    if order == "file":
        # The epsilon keeps a fraction computed as 1 - 0.15 - 0.05 (0.7999...) from losing a record.
        train_size, test_size = (int(total * fraction + 1e-9) for fraction in (fractions[0], fractions[2]))
        val_size = total - train_size - test_size
        sizes = {"train": train_size, "test": test_size, "val": val_size}
    else:
        random.Random(seed).shuffle(entries)
        val_size, test_size = round(total * fractions[1]), round(total * fractions[2])
        sizes = {"train": total - val_size - test_size, "val": val_size, "test": test_size}
    if min(sizes.values()) < 1:
        raise UserError(f"{total} records are too few to split {tuple(fractions)} into non-empty "
                        "training, validation and test sets; add records or raise --limit")
    parts, start = {}, 0
    for name, size in sizes.items():  # in the order the parts follow each other
        parts[name], start = entries[start:start + size], start + size
    return parts["train"], parts["val"], parts["test"]


# ----------------------------------------------------------------------------- training batches
class InstructionDataset(torch.utils.data.Dataset):
    """Each entry as (token ids of prompt + output, number of prompt tokens).

    Prompt and output are tokenized apart so the prompt's tokens are exactly those the model sees when
    it answers (evaluate_responses.py, the app), and --mask-prompt knows where the response starts.
    Text is encoded as ordinary text: a literal "<|endoftext|>" in a record is not the end token.
    """

    def __init__(self, entries):
        tokenizer = get_tokenizer()
        self.entries = entries
        self.examples = []
        for entry in entries:
            prompt = tokenizer.encode_ordinary(format_prompt(entry))
            self.examples.append((prompt + tokenizer.encode_ordinary(entry["output"]), len(prompt)))

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]


def collate_instructions(samples, max_length, mask_prompt=False, pad_token_id=END_OF_TEXT_ID):
    """(input_ids, targets), both (batch, longest sample), from InstructionDataset samples.

    Each sequence ends with <|endoftext|>, which the model learns to produce when its answer is done;
    the targets are the inputs shifted by one. Shorter sequences are padded with <|endoftext|> too, but
    only the first end token is a target: the padding after it is IGNORE_INDEX. With mask_prompt the
    prompt's tokens are ignored as well, so the loss is on the response only. Sequences longer than
    `max_length` are cut at the end.
    """
    sequences = [(ids + [END_OF_TEXT_ID])[:max_length + 1] for ids, _ in samples]
    width = max(len(sequence) for sequence in sequences) - 1
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    targets = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (sequence, (_, prompt_length)) in enumerate(zip(sequences, samples)):
        input_ids[row, :len(sequence) - 1] = torch.tensor(sequence[:-1])
        targets[row, :len(sequence) - 1] = torch.tensor(sequence[1:])
        if mask_prompt:
            # Position i predicts token i + 1: the first response token is predicted at prompt_length - 1.
            targets[row, :prompt_length - 1] = IGNORE_INDEX
    return input_ids, targets


# ----------------------------------------------------------------------------- answering
@torch.inference_mode()
def generate_responses(model, entries, max_new_tokens, temperature=0.0, top_k=None, top_p=None, generator=None,
                       decoder=None):
    """The model's answer to each entry's Alpaca prompt, generated as one batch, each ending at
    <|endoftext|> (not included) or after `max_new_tokens`.

    Prompts of different lengths are padded on the left, so every answer starts at the same column,
    and the attention mask keeps the padding out of attention and positions. decoder: generate's (None:
    the eager path; evaluate_responses.py passes a CompiledDecoder unless --no-compile)."""
    tokenizer = get_tokenizer()
    prompts = [tokenizer.encode_ordinary(format_prompt(entry)) for entry in entries]
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), END_OF_TEXT_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = True
    device = next(model.parameters()).device
    output = generate(model, input_ids.to(device), max_new_tokens, temperature, top_k, top_p,
                      eos_token_id=END_OF_TEXT_ID, generator=generator,
                      attention_mask=None if attention_mask.all() else attention_mask.to(device), decoder=decoder)
    responses = []
    for row in output[:, width:].tolist():
        if END_OF_TEXT_ID in row:
            row = row[:row.index(END_OF_TEXT_ID)]
        responses.append(tokenizer.decode(row).strip())
    return responses

"""Pretraining data: text -> GPT-2 tokens cached on disk -> fixed-length training windows.

Text is tokenized once and stored next to it as raw uint16 token ids (the same layout as a
pre-tokenized .bin, e.g. nanoGPT's), then read through numpy.memmap, so a corpus larger than RAM
works and a second run starts at once. The cache records a hash of the text and is rebuilt when the
text changes; where it cannot be written, it is kept in the user's cache folder or not at all.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..caches import cache_paths, write_cache
from ..config import TOKENIZER_VOCABULARY
from ..errors import UserError
from ..files import atomic_file, atomic_write_text
from ..tokenizer import END_OF_TEXT_ID, get_tokenizer

CHUNK_CHARACTERS = 1 << 20  # tokenize a large file a megabyte at a time


def text_files(path):
    """The .txt files `path` stands for: itself, or those in a folder (sorted, recursively)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"the folder {path} holds no .txt files; --data takes a .txt file, a folder of them, or a .bin of tokens")
        return files
    if path.is_file():
        return [path]
    raise UserError(f"--data {path} does not exist; give a .txt file, a folder of .txt files, or a pre-tokenized .bin")


def _fingerprint(files):
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def _chunks(file):
    """Pieces of a text file of about CHUNK_CHARACTERS, cut after a newline so no word is split."""
    with open(file, encoding="utf-8", errors="strict") as handle:
        pending = ""
        while block := handle.read(CHUNK_CHARACTERS):
            pending += block
            cut = pending.rfind("\n") + 1
            if cut:
                yield pending[:cut]
                pending = pending[cut:]
        if pending:
            yield pending


def token_arrays(files):
    """The tokens of `files`, separated by <|endoftext|>, as uint16 arrays of about a megabyte of text each,
    with a progress bar."""
    tokenizer = get_tokenizer()
    total_bytes = sum(file.stat().st_size for file in files)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing") as bar:
        for index, file in enumerate(files):
            if index:
                yield np.array([END_OF_TEXT_ID], dtype=np.uint16)
            try:
                for chunk in _chunks(file):
                    yield np.array(tokenizer.encode_ordinary(chunk), dtype=np.uint16)
                    bar.update(len(chunk.encode("utf-8")))
            except UnicodeDecodeError as error:
                raise UserError(f"{file} is not UTF-8 text (byte {error.start}): convert it to UTF-8 first") from None


def tokenize_to_cache(files, cache_path, fingerprint):
    """Tokenize `files` into `cache_path` as raw uint16, and record `fingerprint` beside it (.json), each
    file whole or not at all; raises WriteRefused where the operating system refuses."""
    with atomic_file(cache_path) as out:
        for tokens in token_arrays(files):
            tokens.tofile(out)
    atomic_write_text(cache_metadata_path(cache_path),
                      json.dumps({"sha256": fingerprint, "tokenizer": "gpt2", "files": len(files)}))


def cache_metadata_path(cache_path):
    return cache_path.with_suffix(".json")  # corpus.txt.tokens.bin -> corpus.txt.tokens.json


def cache_holds(cache_path, fingerprint):
    """Whether `cache_path` holds the tokens of the text whose fingerprint is `fingerprint`."""
    try:
        metadata = json.loads(cache_metadata_path(cache_path).read_text())
    except (OSError, ValueError):
        return False  # no cache yet, or a damaged one: it is rebuilt
    return metadata.get("sha256") == fingerprint and cache_path.is_file()


def load_tokens(path):
    """All tokens of --data as a read-only uint16 array, tokenizing (once) when given text. The tokens of
    text are cached beside it (`corpus.txt.tokens.bin`), else in the user's cache folder, else not at all
    (modules/caches.py): a corpus on a read-only disk trains all the same."""
    path = Path(path)
    if path.suffix == ".bin" and path.is_file():
        return read_token_file(path)
    files = text_files(path)
    fingerprint = _fingerprint(files)
    cache = path.with_name(path.name + ".tokens.bin")
    for location in cache_paths(cache):
        if cache_holds(location, fingerprint):
            return read_token_file(location, check_ids=False)  # our tokenizer wrote it
    location = write_cache(cache, lambda location: tokenize_to_cache(files, location, fingerprint),
                           f"the tokens of {path}")
    if location is None:
        return np.concatenate([np.zeros(0, np.uint16), *token_arrays(files)])
    return read_token_file(location, check_ids=False)


def read_token_file(path, check_ids=True):
    """The GPT-2 token ids in a pre-tokenized .bin (raw uint16, as nanoGPT writes them) as a read-only
    memmap, checked to be whole tokens and, with `check_ids` (a user's file: it reads the whole file
    once), ids of GPT-2's vocabulary."""
    size = path.stat().st_size
    layout = ("a .bin holds GPT-2 token ids as raw uint16 (2 bytes each, e.g. numpy's "
              "np.array(ids, dtype=np.uint16).tofile(path)), or pass the text itself (a .txt file or a folder)")
    if size % 2:
        raise UserError(f"{path} is {size:,} bytes, an odd number, so it is not whole tokens: {layout}")
    if not size:
        return np.zeros(0, np.uint16)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    vocabulary = TOKENIZER_VOCABULARY
    if check_ids and (largest := int(tokens.max())) >= vocabulary:
        raise UserError(f"{path} holds the token id {largest} at {int(tokens.argmax()):,}, but GPT-2's ids "
                        f"are 0 to {vocabulary - 1}: {layout}")
    return tokens


class TokenWindows(torch.utils.data.Dataset):
    """Non-overlapping windows of `context_size` tokens; each target is its input shifted by one.
    (Windows at every position, as nanoGPT samples them, trained no better here: README, "Pretraining".)"""

    def __init__(self, tokens, context_size):
        self.tokens = tokens
        self.context_size = context_size

    def __len__(self):
        return max(0, (len(self.tokens) - 1) // self.context_size)

    def __getitem__(self, index):
        start = index * self.context_size
        window = torch.from_numpy(self.tokens[start:start + self.context_size + 1].astype(np.int64))
        return window[:-1], window[1:]


def train_val_windows(tokens, context_size, val_fraction, source="the corpus"):
    """Split the token stream (the last `val_fraction` for validation) into TokenWindows; `source` names
    the corpus in the message when it is too short."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1, not {val_fraction}")
    split = int(len(tokens) * (1.0 - val_fraction))
    train, val = TokenWindows(tokens[:split], context_size), TokenWindows(tokens[split:], context_size)
    if len(train) == 0 or len(val) == 0:
        needed = int((context_size + 1) / min(val_fraction, 1.0 - val_fraction)) + 1
        raise UserError(
            f"{source} has {len(tokens):,} tokens, too few for a context of {context_size}: with --val-fraction "
            f"{val_fraction} it needs at least {needed:,} tokens (about {needed * 4:,} characters of English). "
            "Add text, or lower --context-size."
        )
    return train, val

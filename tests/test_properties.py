"""Every reader of a user's file, on inputs nobody wrote by hand (Hypothesis): random bytes, truncations,
other encodings, 0, 1 and many records, wrong types, huge and negative numbers.

Each reader gives a valid result or raises the project's one UserError, whose message names the file;
any other exception fails the test. The examples are derandomized (the same every run) and their number
fixed, so a failure repeats and the file's time in CI stays put; Hypothesis prints the falsifying input."""
import functools
import io
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import MICRO_CONFIG
from modules import GPTModel
from modules.checkpoint import KINDS, open_checkpoint, save_checkpoint
from modules.config import REQUIRED_KEYS, resolve_config
from modules.datasets.corpus import load_tokens
from modules.datasets.instructions import load_instruction_data
from modules.datasets.sms_spam import LABEL_NAMES, read_messages
from modules.errors import UserError
from modules.pretrained import load_gpt2, load_gpt2_from_hf
from modules.results import ResumableResults
from gpt_eval import load_responses

pytestmark = pytest.mark.slow  # not in the quick tier (python -m pytest -m "not slow")

EXAMPLES = settings(max_examples=40, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW_EXAMPLES = settings(EXAMPLES, max_examples=15)


@contextmanager
def folder():
    """A fresh folder for one example (pytest's tmp_path is shared by all the examples of a test)."""
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def read_or_refuse(read, path, *args):
    """read(path, *args), or None when it raised a UserError naming `path`; any other exception fails."""
    try:
        return read(path, *args)
    except UserError as error:
        assert Path(path).name in str(error), f"the message does not name {path}: {error}"
        return None


# ----------------------------------------------------------------------------- the inputs
ENCODINGS = ("utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252")
NUMBERS = st.one_of(st.integers(-2**70, 2**70), st.integers(-3, 300), st.integers(0, 70).map(lambda n: 2**n), st.floats(allow_nan=True),
                    st.booleans(), st.none())
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                         st.text(max_size=20))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


def encoded(texts):
    """`texts` written in one of several encodings, or (when a character does not exist there) in UTF-8."""
    def encode(text, encoding):
        try:
            return text.encode(encoding)
        except UnicodeEncodeError:
            return text.encode("utf-8")
    return st.builds(encode, texts, st.sampled_from(ENCODINGS))


def damaged(contents):
    """`contents`, or random bytes, or `contents` cut at any point."""
    cut = st.tuples(contents, st.floats(0, 1)).map(lambda pair: pair[0][:int(len(pair[0]) * pair[1])])
    return st.one_of(contents, cut, st.binary(max_size=300))


def record(keys, values):
    """A dict holding some of `keys` (with values of `values` or of any JSON type) and perhaps others."""
    extra = st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=2)
    known = st.fixed_dictionaries({}, optional={key: values | JSON_VALUES for key in keys})
    return st.builds(lambda extra, known: {**extra, **known}, extra, known)


def json_file(records):
    """A file holding a list of `records` as JSON or as JSON Lines, or any JSON value, damaged or not."""
    as_json = st.builds(json.dumps, st.lists(records, max_size=5) | JSON_VALUES, ensure_ascii=st.booleans())
    as_lines = st.lists(records, max_size=5).map(lambda items: "\n".join(json.dumps(item, ensure_ascii=False) for item in items))
    return damaged(encoded(as_json | as_lines))


TEXTS = st.text(st.characters(codec="utf-8"), max_size=40)


# ----------------------------------------------------------------------------- text corpora and tokens
def valid_tokens(tokens):
    assert isinstance(tokens, np.ndarray) and tokens.dtype == np.uint16
    assert len(tokens) == 0 or int(tokens.max()) < 50257


@EXAMPLES
@given(contents=damaged(encoded(TEXTS)), suffix=st.sampled_from([".txt", ".bin"]))
def test_a_text_or_token_file_is_read_or_refused(contents, suffix):
    with folder() as directory:
        path = directory / f"corpus{suffix}"
        path.write_bytes(contents)
        if (tokens := read_or_refuse(load_tokens, path)) is not None:
            valid_tokens(tokens)


@FEW_EXAMPLES
@given(files=st.lists(st.tuples(st.sampled_from(["a.txt", "b.txt", "sub/c.txt", "notes.md", "sub/d.TXT"]),
                                damaged(encoded(TEXTS))), max_size=4))
def test_a_corpus_folder_is_read_or_refused(files):
    with folder() as directory:
        corpus = directory / "corpus"
        corpus.mkdir()
        for name, contents in files:
            (corpus / name).parent.mkdir(exist_ok=True)
            (corpus / name).write_bytes(contents)
        if (tokens := read_or_refuse(load_tokens, corpus)) is not None:
            valid_tokens(tokens)


# ----------------------------------------------------------------------------- the SMS data, both layouts
LABELS = st.sampled_from(["ham", "spam", "0", "1", "HAM", " spam ", "", "eggs", "2"])
MESSAGES = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30)
TSV = st.lists(st.tuples(LABELS, MESSAGES), max_size=6).map(
    lambda rows: "".join(f"{label}\t{text}\n" for label, text in rows))
CSV_HEADER = st.sampled_from(["label,text", "Label,Text", "text,label", "label", "label,text,extra", "", "a,b"])
CSV = st.tuples(CSV_HEADER, st.lists(st.tuples(LABELS, MESSAGES, st.booleans()), max_size=6)).map(
    lambda table: table[0] + "\n" + "".join(
        f"{label},{json.dumps(text) if quoted else text}\n" for label, text, quoted in table[1]))


@EXAMPLES
@given(contents=damaged(encoded(TSV | CSV)), suffix=st.sampled_from(["", ".tsv", ".csv"]),
       quoting=st.sampled_from(["none", "pandas"]))
def test_the_sms_data_is_read_or_refused(contents, suffix, quoting):
    with folder() as directory:
        path = directory / f"SMSSpamCollection{suffix}"
        path.write_bytes(contents)
        if (messages := read_or_refuse(read_messages, path, quoting)) is not None:
            assert list(messages.columns) == ["label", "text"] and len(messages) > 0
            assert set(messages["label"]) <= set(LABEL_NAMES)
            assert all(isinstance(text, str) and text.strip() for text in messages["text"])


# ----------------------------------------------------------------------------- instructions and answers
INSTRUCTION_KEYS = ["instruction", "input", "output"]


@EXAMPLES
@given(contents=json_file(record(INSTRUCTION_KEYS, TEXTS)), suffix=st.sampled_from([".json", ".jsonl"]))
def test_instruction_data_is_read_or_refused(contents, suffix):
    with folder() as directory:
        path = directory / f"data{suffix}"
        path.write_bytes(contents)
        if (records := read_or_refuse(load_instruction_data, path)) is not None:
            assert records and all(set(entry) == set(INSTRUCTION_KEYS) for entry in records)
            assert all(isinstance(value, str) for entry in records for value in entry.values())


ANSWER_KEYS = ["instruction", "input", "output", "model_response", "model response"]


@EXAMPLES
@given(contents=json_file(record(ANSWER_KEYS, TEXTS)))
@example(contents=b'[{"instruction": "a", "output": "b", "model_response": 3}]')
def test_the_answers_gpt_eval_reads_are_read_or_refused(contents):
    with folder() as directory:
        path = directory / "responses.json"
        path.write_bytes(contents)
        if (entries := read_or_refuse(load_responses, path)) is not None:
            assert all(set(entry) == {"instruction", "input", "output", "model_response"} for entry in entries)
            assert all(isinstance(value, str) for entry in entries for value in entry.values())


@EXAMPLES
@given(contents=json_file(record(["instruction", "output", "score", "judge_model"], TEXTS | NUMBERS)))
def test_an_earlier_results_file_is_read_or_refused(contents):
    items = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    with folder() as directory:
        path = directory / "scores.json"
        path.write_bytes(contents)
        results = read_or_refuse(lambda path: ResumableResults(
            path, items, key=lambda entry: (entry.get("instruction"), entry.get("output")), what="a scores file",
            keeps=lambda entry: entry.get("judge_model") is not None, to_file=list), path)
        if results is not None:
            assert len(results.results) == len(items)


# ----------------------------------------------------------------------------- model configs
def buildable(config):
    """A config that passes is one a model can be built from (on the meta device: no memory)."""
    assert set(REQUIRED_KEYS) <= set(config)
    with torch.device("meta"):
        GPTModel(config)


CONFIG_VALUES = {key: NUMBERS for key in REQUIRED_KEYS} | {"qkv_bias": st.booleans() | JSON_SCALARS}


@EXAMPLES
@given(contents=damaged(encoded(st.builds(json.dumps, st.fixed_dictionaries({}, optional=CONFIG_VALUES) | JSON_VALUES))))
def test_a_json_model_config_is_read_or_refused(contents):
    with folder() as directory:
        path = directory / "config.json"
        path.write_bytes(contents)
        if (config := read_or_refuse(resolve_config, str(path))) is not None:
            buildable(config)


# ----------------------------------------------------------------------------- checkpoints
def _saved(payload):
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


MICRO_MODEL = GPTModel(MICRO_CONFIG)
OTHER_CONFIGS = st.fixed_dictionaries({}, optional={key: NUMBERS for key in REQUIRED_KEYS}).map(
    lambda changes: {**MICRO_CONFIG, **changes})
PAYLOADS = st.one_of(
    st.builds(lambda config, kind: {"config": config, "kind": kind, "model_state_dict": MICRO_MODEL.state_dict()},
              OTHER_CONFIGS | JSON_VALUES, st.sampled_from([*KINDS, "tokenizer", ""]) | JSON_SCALARS),
    st.builds(lambda value: {"model_state_dict": value}, JSON_VALUES),
    JSON_VALUES,
)


@functools.cache
def micro_checkpoint_bytes():
    with folder() as directory:
        save_checkpoint(directory / "lm.pt", MICRO_MODEL, "lm", step=3)
        return (directory / "lm.pt").read_bytes()


@EXAMPLES
@given(data=st.data())
def test_a_checkpoint_is_loaded_or_refused(data):
    contents = data.draw(damaged(st.just(micro_checkpoint_bytes()) | PAYLOADS.map(_saved)))
    with folder() as directory:
        path = directory / "model.pt"
        path.write_bytes(contents)
        if (loaded := read_or_refuse(open_checkpoint, path, "cpu", KINDS)) is not None:
            assert loaded.kind in KINDS and loaded.model(torch.zeros(1, 2, dtype=torch.long)).shape[:2] == (1, 2)


# ----------------------------------------------------------------------------- OpenAI's and Hugging Face's folders
TINY_HPARAMS = {"n_vocab": 64, "n_ctx": 8, "n_embd": 8, "n_head": 2, "n_layer": 1}
HPARAMS = st.fixed_dictionaries({}, optional={key: NUMBERS | st.just(value) for key, value in TINY_HPARAMS.items()})


def _tiny_transformers_model():
    import transformers

    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=8, n_embd=8, n_head=2, n_layer=1)).eval()


@functools.cache
def openai_folder_files():
    from tests.openai_layout import gpt2_tensors_from_transformers, write_openai_checkpoint

    with folder() as directory:
        write_openai_checkpoint(gpt2_tensors_from_transformers(_tiny_transformers_model()), TINY_HPARAMS, directory)
        return {path.name: path.read_bytes() for path in directory.iterdir() if path.is_file()}


@pytest.mark.filterwarnings("ignore:The recursion limit will not be reset")  # TensorFlow's import raises it
@FEW_EXAMPLES
@given(data=st.data())
def test_an_openai_checkpoint_folder_is_loaded_or_refused(data):
    pytest.importorskip("tensorflow")
    files = dict(openai_folder_files())
    files["hparams.json"] = data.draw(damaged(encoded(st.builds(json.dumps, HPARAMS | JSON_VALUES))))
    for name in ("model.ckpt.index", "checkpoint"):
        files[name] = data.draw(damaged(st.just(files[name])))
    with folder() as directory:
        for name, contents in files.items():
            (directory / name).write_bytes(contents)
        if (model := read_or_refuse(load_gpt2, directory)) is not None:
            assert model.config["embedding_dim"] == 8


@functools.cache
def hf_folder_files():
    with folder() as directory:
        _tiny_transformers_model().save_pretrained(directory)
        return {path.name: path.read_bytes() for path in directory.iterdir() if path.is_file()}


@FEW_EXAMPLES
@given(data=st.data())
def test_a_hugging_face_folder_is_loaded_or_refused(data):
    files = dict(hf_folder_files())
    real = json.loads(files["config.json"])
    changed = st.fixed_dictionaries({}, optional={key: NUMBERS | JSON_SCALARS for key in
                                                  ["n_embd", "n_head", "n_layer", "n_positions", "vocab_size",
                                                   "model_type", "activation_function", "n_inner"]})
    files["config.json"] = data.draw(damaged(encoded(st.builds(
        json.dumps, changed.map(lambda changes: {**real, **changes}) | JSON_VALUES))))
    weights = data.draw(st.sampled_from(["model.safetensors", "pytorch_model.bin"]))
    real_weights = files.pop("model.safetensors")
    if weights == "pytorch_model.bin":
        real_weights = _saved(_tiny_transformers_model().state_dict())
    files[weights] = data.draw(damaged(st.just(real_weights) | PAYLOADS.map(_saved)))
    with folder() as directory:
        for name, contents in files.items():
            (directory / name).write_bytes(contents)
        if (model := read_or_refuse(load_gpt2_from_hf, directory)) is not None:
            assert model.config["embedding_dim"] == 8

"""The SMS Spam Collection (UCI): 5,574 text messages labelled ham (legitimate) or spam.

Read from UCI's zip by default, or from a local file: UCI's tab-separated SMSSpamCollection
(`label<TAB>text` per line, no header) or a CSV with `label` and `text` columns (the original project's
train.csv, validation.csv and test.csv, with labels 0 and 1, too). As in the original project, the
classes are balanced by undersampling ham to the number of spam messages, then shuffled and split
70/10/20 into training, validation and test sets; with the original's way of reading the file
(quoting "pandas") and seed 123, the splits are the original's, message for message.
"""
import warnings
import zipfile
from pathlib import Path

import pandas as pd

from ..caches import cache_paths, write_cache
from ..download import download_file
from ..errors import UserError
from ..files import atomic_write_text

SMS_SPAM_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
LABEL_NAMES = ("ham", "spam")  # class index 0 and 1
# How quotes in UCI's tab-separated file are read. UCI's file has no quoting: "none" keeps every " as
# part of its message (5,574 messages). "pandas" reads it as the original did, with
# pandas.read_csv(sep="\t"), which takes a message that starts with a quote for a quoted field: 53
# messages lose quotes, and one, whose quote is not closed on its line, takes in the next two lines
# (5,572 messages).
QUOTINGS = ("none", "pandas")
DATA_FILE = "SMSSpamCollection"
LOCAL_HINT = "--data PATH (UCI's SMSSpamCollection file, or a CSV with label and text columns)"


# ----------------------------------------------------------------------------- getting the file
def fetch_sms_spam(data_dir, url=SMS_SPAM_URL):
    """Path of SMSSpamCollection in `data_dir`, downloading and extracting UCI's zip when it is not there
    (both kept in the user's cache folder where `data_dir` cannot be written, modules/caches.py)."""
    path = Path(data_dir) / DATA_FILE
    for location in cache_paths(path):
        if location.is_file():
            return location
    archive = download_file(url, path.with_name("sms_spam_collection.zip"), hint=f"Without network access, pass {LOCAL_HINT}.")
    try:
        with zipfile.ZipFile(archive) as zipped:
            text = zipped.read(DATA_FILE).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError):
        raise UserError(f"{archive} is not UCI's zip holding {DATA_FILE}: delete it and run again, or pass {LOCAL_HINT}") from None
    # Written whole or not at all: a half-extracted file would pass for the data set next time.
    return write_cache(path, lambda location: atomic_write_text(location, text), f"{DATA_FILE}, extracted from {archive},",
                       required=True)


# ----------------------------------------------------------------------------- reading it
def read_messages(path, quoting="none"):
    """A DataFrame with columns `label` ("ham" or "spam") and `text`, one row per message.

    A .csv file is read as CSV with a header naming `label` and `text` columns (any case); anything
    else as UCI's tab-separated format, its quotes as `quoting` says (QUOTINGS). A label is ham or
    spam, or 0 or 1 (the original's CSVs). A malformed line stops with its number and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data {path} does not exist; give UCI's SMSSpamCollection file or a CSV with label and text columns")
    if quoting not in QUOTINGS:
        raise UserError(f"--quoting must be one of {', '.join(QUOTINGS)}, not {quoting!r}")
    try:
        if path.suffix.lower() == ".csv":
            rows = list(_read_csv(path))
        else:
            rows = list(_read_tsv(path) if quoting == "none" else _read_tsv_like_pandas(path))
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (byte {error.start}): convert it to UTF-8 first") from None
    messages = []
    for line_number, label, text in rows:
        label = label.strip().lower()
        label = LABEL_NAMES[int(label)] if label in ("0", "1") else label
        if label not in LABEL_NAMES:
            raise UserError(f"{path}, line {line_number}: expected the label 'ham' or 'spam' (or 0 or 1), found {label!r}")
        if not text.strip():
            raise UserError(f"{path}, line {line_number}: the {label} message is empty; every message needs a text")
        messages.append((label, text))
    if not messages:
        raise UserError(f"{path} holds no messages")
    return pd.DataFrame(messages, columns=["label", "text"])


def _read_tsv(path):
    """(line number, label, text) of each non-blank line of `label<TAB>text` lines."""
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            label, tab, text = line.partition("\t")
            if not tab:
                raise UserError(f"{path}, line {line_number}: expected a label (ham or spam), a tab, then the message; found no tab")
            yield line_number, label, text


def _read_csv(path):
    """(line number, label, text) of each row of a CSV with `label` and `text` columns."""
    frame = _read_with_pandas(path, "CSV", "with label and text columns", "quote texts that hold commas")
    columns = {name.strip().lower(): name for name in frame.columns}
    if not {"label", "text"} <= columns.keys():
        raise UserError(f"{path}, line 1: expected a header with 'label' and 'text' columns, found {list(frame.columns)}")
    if frame.empty:
        raise UserError(f"{path} holds a header but no messages")
    return _numbered_rows(frame, columns["label"], columns["text"], first_line=2)


def _read_tsv_like_pandas(path):
    """(line number, label, text) of each row of UCI's file read as the original read it (quoting "pandas")."""
    frame = _read_with_pandas(path, "tab-separated file", "of label<TAB>text lines", "one tab a line",
                              sep="\t", header=None, names=["label", "text"])
    return _numbered_rows(frame, "label", "text", first_line=1)


def _read_with_pandas(path, kind, layout, advice, **read_options):
    """pandas.read_csv of `path`, every field as text; a malformed file ends in one line that says which
    `kind` of file with which `layout` was expected, and the `advice` that fixes it."""
    try:
        with warnings.catch_warnings():
            # pandas only warns when a row has more fields than the header, and drops the extra ones.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False, encoding="utf-8", **read_options)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path} is empty; expected a {kind} {layout}") from None
    except pd.errors.ParserError as error:
        raise UserError(f"{path} is not a valid {kind}: {str(error).strip()} ({advice})") from None
    except pd.errors.ParserWarning:
        raise UserError(f"{path} is not a valid {kind}: a row has more fields than expected ({advice})") from None


def _numbered_rows(frame, label_column, text_column, first_line):
    """(line number, label, text) of each row of `frame`. A quoted field can span lines, so a row's line
    is `first_line` plus the lines of the rows before it."""
    frame = frame.fillna("")  # a row with fewer fields than the header: they are empty
    lines_per_row = 1 + frame.map(lambda value: value.count("\n")).sum(axis=1).astype(int)
    first_lines = first_line + lines_per_row.cumsum() - lines_per_row
    return zip(first_lines, frame[label_column], frame[text_column])


# ----------------------------------------------------------------------------- preparing the splits
def balance(messages, seed):
    """Undersample the larger class (ham) to the size of the smaller one (spam), as the original did:
    a sample of the larger class drawn with `seed`, then every message of the smaller in file order."""
    counts = messages["label"].value_counts()  # the larger class first
    if len(counts) < len(LABEL_NAMES):
        raise UserError(f"the data holds only {counts.index[0]} messages; a classifier needs both ham and spam examples")
    larger, smaller = (messages[messages["label"] == label] for label in (counts.index[0], counts.index[-1]))
    return pd.concat([larger.sample(len(smaller), random_state=seed), smaller])


def split(messages, seed, train_fraction=0.7, val_fraction=0.1):
    """Shuffle, then cut into training, validation and test sets (the rest, 20% by default)."""
    messages = messages.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(messages) * train_fraction)
    val_end = train_end + int(len(messages) * val_fraction)
    if not 0 < train_end < val_end < len(messages):
        raise UserError(f"{len(messages)} messages are too few for training, validation and test sets; use at least 10")
    return messages[:train_end], messages[train_end:val_end], messages[val_end:]


def split_paths(checkpoint):
    """Where the splits are written, beside the checkpoint: classifier.pt -> classifier.train.csv ..."""
    checkpoint = Path(checkpoint)
    return {name: checkpoint.with_name(f"{checkpoint.stem}.{name}.csv") for name in ("train", "validation", "test")}


def write_splits(splits, checkpoint):
    """Save the (train, validation, test) DataFrames as CSVs that --data can read back."""
    for frame, path in zip(splits, split_paths(checkpoint).values()):
        atomic_write_text(path, frame.to_csv(index=False))


def as_samples(messages):
    """[(text, class index)] for the training loop."""
    return [(text, LABEL_NAMES.index(label)) for label, text in zip(messages["label"], messages["text"])]

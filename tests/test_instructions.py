import json

import pytest
import torch

from tests.conftest import SHARED_DATA
from modules.errors import UserError
from modules.datasets.instructions import (IGNORE_INDEX, InstructionDataset, collate_instructions, fetch_alpaca,
                                           format_prompt, load_instruction_data, split_instruction_data)
from modules.tokenizer import END_OF_TEXT_ID, get_tokenizer

pytestmark = pytest.mark.slow  # not in the quick tier (python -m pytest -m "not slow")


def test_prompt_has_input_section_only_when_there_is_an_input():
    with_input = format_prompt({"instruction": "Translate.", "input": "Hallo", "output": "Hello"})
    assert with_input == (
        "Below is an instruction that describes a requested task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nTranslate.\n\n### Input:\nHallo\n\n### Response:\n"
    )
    without = format_prompt({"instruction": "Say hi.", "input": "", "output": "Hi"})
    assert "### Input" not in without and without.endswith("### Instruction:\nSay hi.\n\n### Response:\n")


# ----------------------------------------------------------------------------- data
RECORDS = [{"instruction": f"Add {i} and 1.", "input": "" if i % 2 else f"{i}", "output": f"{i + 1}"} for i in range(20)]


def test_json_list_and_jsonl_load_the_same_records_input_defaulting_to_empty(tmp_path):
    listed, lines = tmp_path / "data.json", tmp_path / "data.jsonl"
    listed.write_text(json.dumps(RECORDS))
    lines.write_text("\n".join(json.dumps(record) for record in RECORDS) + "\n\n")
    assert load_instruction_data(listed) == load_instruction_data(lines) == RECORDS
    assert load_instruction_data(listed, limit=3) == RECORDS[:3]
    listed.write_text(json.dumps([{"instruction": "Hi.", "output": "Hello."}]))
    assert load_instruction_data(listed) == [{"instruction": "Hi.", "input": "", "output": "Hello."}]


@pytest.mark.parametrize("content, message", [
    (json.dumps(RECORDS[:5] + [{"instruction": "x", "input": ""}]), r"record 5 of .* has no 'output'"),
    (json.dumps({"instruction": "x", "output": "y"}), "holds a JSON dict, not a list of records"),
    (json.dumps([]), "holds no records"),
    (json.dumps(["just text"]), "record 0 of .* is a str"),
    ('[{"instruction": "x", "output": ', r"not valid JSON \(line 1"),
    ('{"instruction": "x", "output": "y"}\n{"instruction": ', "line 2 is not valid JSON"),
])
def test_malformed_data_is_refused_with_the_place_named(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_instruction_data(path)


def test_invalid_utf8_and_missing_file(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps([{"instruction": "Caf\u00e9", "output": "x"}], ensure_ascii=False).encode("latin-1"))
    with pytest.raises(UserError, match="latin1.json is not UTF-8 text"):
        load_instruction_data(path)
    with pytest.raises(UserError, match="nope.json does not exist"):
        load_instruction_data(tmp_path / "nope.json")


def test_split_is_seeded_disjoint_and_complete():
    train, val, test = split_instruction_data(RECORDS, seed=1)
    assert (len(train), len(val), len(test)) == (16, 2, 2)
    assert sorted(map(str, train + val + test)) == sorted(map(str, RECORDS))
    assert split_instruction_data(RECORDS, seed=1) == (train, val, test)
    assert split_instruction_data(RECORDS, seed=2) != (train, val, test)
    with pytest.raises(UserError, match="too few"):
        split_instruction_data(RECORDS[:5], seed=1)
    with pytest.raises(UserError, match="summing to 1"):
        split_instruction_data(RECORDS, seed=1, fractions=(0.8, 0.1, 0.2))


def test_file_order_split_keeps_the_order_with_test_before_validation():
    train, val, test = split_instruction_data(RECORDS, seed=1, order="file")
    assert (train, test, val) == (RECORDS[:16], RECORDS[16:18], RECORDS[18:])
    # 1 - 0.15 - 0.05 is 0.7999...: the training set still gets its 80%.
    assert len(split_instruction_data(RECORDS, 1, (1.0 - 0.15 - 0.05, 0.15, 0.05), "file")[0]) == 16
    with pytest.raises(UserError, match="too few"):
        split_instruction_data(RECORDS[:5], seed=1, order="file")
    with pytest.raises(UserError, match="split order must be one of shuffled, file"):
        split_instruction_data(RECORDS, seed=1, order="sorted")


def test_real_instruction_data_splits_880_110_110():
    path = SHARED_DATA / "instruction-data.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    train, val, test = split_instruction_data(load_instruction_data(path), seed=123)
    assert (len(train), len(val), len(test)) == (880, 110, 110)
    assert all(entry["instruction"] and entry["output"] for entry in train + val + test)


def test_no_network_names_the_url_and_the_way_around_it(tmp_path, monkeypatch):
    monkeypatch.setattr("modules.download.time.sleep", lambda seconds: None)  # no waiting between the retries
    url = "http://127.0.0.1:9/alpaca_data.json"  # the discard port: nothing listens there
    with pytest.raises(UserError, match=r"could not download http://127.0.0.1:9/alpaca_data.json .*--data PATH"):
        fetch_alpaca(tmp_path / "alpaca_data.json", url)
    assert list(tmp_path.iterdir()) == []  # no partial file left under the real name


# ----------------------------------------------------------------------------- batches
def test_padded_batch_targets_are_shifted_and_padding_after_the_end_token_ignored():
    entries = [{"instruction": "Say hi.", "input": "", "output": "Hi there, friend."},
               {"instruction": "Say a longer greeting please.", "input": "now", "output": "Good morning to you all."}]
    dataset = InstructionDataset(entries)
    (short, short_prompt), (long, _) = dataset[0], dataset[1]
    tokenizer = get_tokenizer()
    assert short_prompt == len(tokenizer.encode(format_prompt(entries[0])))
    assert tokenizer.decode(short) == format_prompt(entries[0]) + entries[0]["output"]  # the prompt, then the answer

    inputs, targets = collate_instructions([dataset[0], dataset[1]], max_length=1024)
    assert inputs.shape == targets.shape == (2, len(long))  # the longer sequence plus <|endoftext|>, minus one
    assert inputs[0, :len(short)].tolist() == short
    assert inputs[0, len(short):].eq(END_OF_TEXT_ID).all()  # padded with <|endoftext|>
    assert targets[0, :len(short)].tolist() == short[1:] + [END_OF_TEXT_ID]  # shifted; the first end token is learnt
    assert targets[0, len(short):].eq(IGNORE_INDEX).all()  # the padding after it is not
    assert targets[1].tolist() == long[1:] + [END_OF_TEXT_ID]

    masked_inputs, masked = collate_instructions([dataset[0], dataset[1]], max_length=1024, mask_prompt=True)
    assert torch.equal(masked_inputs, inputs)
    assert masked[0, :short_prompt - 1].eq(IGNORE_INDEX).all()
    # The first target kept is the first token of the response, predicted from the prompt's last token.
    assert masked[0, short_prompt - 1:].tolist() == targets[0, short_prompt - 1:].tolist()
    assert tokenizer.decode(masked[0, short_prompt - 1:len(short)].tolist()) == "Hi there, friend.<|endoftext|>"


def test_max_length_cuts_inputs_and_targets():
    dataset = InstructionDataset([{"instruction": "Count.", "input": "", "output": "one two three four five six"}])
    inputs, targets = collate_instructions([dataset[0]], max_length=10)
    assert inputs.shape == targets.shape == (1, 10)
    assert inputs[0].tolist() == dataset[0][0][:10] and targets[0].tolist() == dataset[0][0][1:11]


def test_the_memory_plan_sees_the_widest_batch_not_the_first():
    # Batches are padded to their longest example: the first batch's width can be far below a later one's.
    from fine_tune_instructional import InstructionTask

    entries = [{"instruction": "Say hi.", "input": "", "output": "Hi."},
               {"instruction": "Count. " * 40, "input": "", "output": "1 2 3"},
               {"instruction": "Say bye.", "input": "", "output": "Bye."}]
    dataset = InstructionDataset(entries)
    widest = len(dataset[1][0])  # its ids and the end token, less the one that is only a target
    assert InstructionTask(dataset, dataset, 1024, False, 0, {}).longest_batch_tokens() == widest
    assert InstructionTask(dataset, dataset, 50, False, 0, {}).longest_batch_tokens() == 50  # cut at max_length

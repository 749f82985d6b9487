"""What this project takes from the original (../shared/original) word for word: its prompts, its judge's
request, its file formats and its model sizes. The original's strings and values are written out here,
each with the file and line it comes from, and compared with what our code produces."""
import json

import pytest

from gpt_eval import load_responses
from modules import GPT_CONFIGS
from modules.config import REQUIRED_KEYS
from modules.datasets.instructions import format_input, format_prompt
from modules.judge import ask_judge, judge_prompt
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # not in the quick tier (python -m pytest -m "not slow")

ORIGINAL = REPO.parent / "shared" / "original"

# utils.py lines 22-26 (format_input): the header, then the instruction.
ORIGINAL_HEADER = ("Below is an instruction that describes a requested task. "
                   "Write a response that appropriately completes the request.")
# gpt_eval.py lines 20-26 (generate_scores): the judge's prompt around format_input(entry).
ORIGINAL_JUDGE_PROMPT = ("Given the input `{input}` and correct output `{output}`, score the model response "
                         "`{response}` on a scale from 0 to 100, where 100 is the best score. Respond with the number only.")


def test_the_alpaca_prompt_is_the_originals_byte_for_byte():
    with_input = {"instruction": "Translate to English.", "input": "Hallo", "output": "Hello"}
    # utils.py line 28: the ### Input section only when the record has an input.
    assert format_input(with_input) == f"{ORIGINAL_HEADER}\n\n### Instruction:\nTranslate to English.\n\n### Input:\nHallo"
    assert format_input({"instruction": "Say hi.", "input": ""}) == f"{ORIGINAL_HEADER}\n\n### Instruction:\nSay hi."
    # utils.py line 12 (InstructionDataset): the response follows the prompt after this marker.
    assert format_prompt(with_input) == format_input(with_input) + "\n\n### Response:\n"


def test_the_judge_prompt_is_the_originals_byte_for_byte():
    entry = {"instruction": "Name a colour.", "input": "", "output": "Blue.", "model_response": "Red."}
    assert judge_prompt(entry) == ORIGINAL_JUDGE_PROMPT.format(
        input=f"{ORIGINAL_HEADER}\n\n### Instruction:\nName a colour.", output="Blue.", response="Red.")


class RecordingClient:
    """Stands in for openai.OpenAI: keeps the keyword arguments of each chat.completions.create call."""

    def __init__(self):
        self.calls = []
        self.chat = self.completions = self

    def create(self, **request):
        self.calls.append(request)
        message = type("Message", (), {"content": "85"})
        return type("Completion", (), {"choices": [type("Choice", (), {"message": message})]})


def test_the_judge_request_is_the_originals():
    client = RecordingClient()
    entry = {"instruction": "Name a colour.", "input": "", "output": "Blue.", "model_response": "Red."}
    assert ask_judge(client, "gpt-4o-mini", entry) == "85"
    # gpt_eval.py lines 8-15 (run_gpt4o_mini): one user message, temperature=0.0, seed=123.
    assert client.calls == [{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": judge_prompt(entry)}],
                             "temperature": 0.0, "seed": 123}]


def test_the_originals_answers_are_read_and_judged_with_its_prompt():
    path = ORIGINAL / "model_responses" / "model_responses_1.json"
    if not path.is_file():
        print(f"skipped: {path} is absent")
        pytest.skip(f"{path} is absent")
    records = json.loads(path.read_text())
    entries = load_responses(path)  # its key is "model response" (evaluate_responses.py line 66)
    assert len(entries) == 200 and [entry["model_response"] for entry in entries] == [r["model response"] for r in records]
    first = records[0]
    prompt = f"{ORIGINAL_HEADER}\n\n### Instruction:\n{first['instruction']}"
    prompt += f"\n\n### Input:\n{first['input']}" if first["input"] else ""
    assert judge_prompt(entries[0]) == ORIGINAL_JUDGE_PROMPT.format(input=prompt, output=first["output"],
                                                                    response=first["model response"])


def test_config_keys_and_the_774m_shape_are_the_originals():
    # config.py lines 1-9 (GPT_124M_CONFIG): the keys; lines 21-29 (GPT_774_CONFIG): the fine-tuned model.
    assert REQUIRED_KEYS == ("vocab_size", "context_size", "embedding_dim", "num_heads", "num_layers", "drop_rate",
                             "qkv_bias")
    assert GPT_CONFIGS["774M"] == {"vocab_size": 50257, "context_size": 1024, "embedding_dim": 1280, "num_heads": 20,
                                   "num_layers": 36, "drop_rate": 0.1, "qkv_bias": True}

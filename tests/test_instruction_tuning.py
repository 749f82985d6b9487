"""fine_tune_instructional.py -> evaluate_responses.py -> gpt_eval.py, on tiny self-made data and models,
with the judge a local OpenAI-compatible server driven through the real openai client."""
import importlib
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from tests.conftest import MICRO_CONFIG, run_script
from modules import GPTModel
from modules.checkpoint import CheckpointError, load_checkpoint, open_checkpoint, read_checkpoint, save_checkpoint
from modules.errors import UserError
from modules.datasets.instructions import split_instruction_data
from modules.judge import parse_score
from modules.lora import apply_lora

pytestmark = pytest.mark.slow  # not in the quick tier (python -m pytest -m "not slow")

NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A micro model instruction-tuned from scratch on 60 records (48 train, 6 val, 6 test)."""
    folder = tmp_path_factory.mktemp("instruct")
    records = [{"instruction": f"Spell the number {i} in words.", "input": "" if i % 3 else "lower case",
                "output": f"The number {i} is {NUMBERS[i % 13]}."} for i in range(60)]
    data = folder / "numbers.json"
    data.write_text(json.dumps(records))
    config = folder / "micro.json"
    config.write_text(json.dumps({**MICRO_CONFIG, "context_size": 96}))
    out = folder / "instruct.pt"
    result = run_script("fine_tune_instructional.py", "--data", data, "--init", "scratch", "--config", config,
                        "--out", out, "--max-steps", "30", "--eval-interval", "15", "--batch-size", "4",
                        "--eval-batches", "2", "--lr", "1e-2", "--sample-tokens", "8", "--mask-prompt")
    return {"data": data, "records": records, "out": out, "log": result.stdout + result.stderr, "folder": folder}


def test_fine_tuning_writes_an_instruct_checkpoint_that_records_its_split(tuned):
    metadata = open_checkpoint(tuned["out"], kinds=("instruct",)).metadata
    data = metadata["data"]
    assert data["path"] == str(tuned["data"]) and data["seed"] == 123 and data["records"] == 60
    assert data["fractions"] == pytest.approx([0.8, 0.1, 0.1]) and metadata["mask_prompt"] is True
    assert metadata["max_length"] == 96
    assert "48 training, 6 validation and 6 test records" in tuned["log"]
    _, val, _ = split_instruction_data(tuned["records"], 123)
    assert f"sample:\n    {val[0]['instruction']} => " in tuned["log"]  # the greedy answer to the first validation record

    metrics = json.loads(tuned["out"].with_suffix(".metrics.json").read_text())
    assert metrics["steps"] == 30 and len(metrics["evaluations"]) == 2
    first, last = metrics["evaluations"]
    assert last["val_loss"] < first["val_loss"] < 9.0  # learnt from the ~10.8 of random weights
    assert metrics["train_loss"] == last["train_loss"] and 0 < metrics["test_loss"] < 9.0
    assert tuned["out"].with_suffix(".loss.png").is_file() and tuned["out"].with_suffix(".last.pt").is_file()


def test_data_errors_end_with_one_message(tmp_path, monkeypatch):
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([{"instruction": "x", "output": "y"}, {"instruction": "no output"}]))
    result = run_script("fine_tune_instructional.py", "--data", broken, "--init", "scratch", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "record 1 of" in result.stderr and "has no 'output'" in result.stderr

    monkeypatch.setattr("modules.download.time.sleep", lambda seconds: None)  # no waiting between the retries
    with pytest.raises(UserError, match=r"could not download http://127.0.0.1:9/alpaca.json .*--data PATH"):
        in_process(monkeypatch, "fine_tune_instructional", "--data-dir", tmp_path,
                   "--data-url", "http://127.0.0.1:9/alpaca.json", "--init", "scratch")


def in_process(monkeypatch, script, *args):
    """Run a script's main() here, as `python script.py args` would (saves starting Python and torch again)."""
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *map(str, args)])
    importlib.import_module(script).main()


def evaluate(monkeypatch, tuned, out, *extra):
    in_process(monkeypatch, "evaluate_responses", "--checkpoint", tuned["out"], "--out", out, "--max-new-tokens", "12", *extra)
    return json.loads(out.read_text())


def test_evaluation_answers_the_test_split_and_resumes_without_redoing_answers(tuned, tmp_path, monkeypatch, capsys):
    out = tmp_path / "responses.json"
    first = evaluate(monkeypatch, tuned, out, "--num", "2")
    _, _, test = split_instruction_data(tuned["records"], 123)
    assert [{key: entry[key] for key in ("instruction", "input", "output")} for entry in first] == test[:2]
    assert all(isinstance(entry["model_response"], str) for entry in first)

    for entry in first:  # an answer that is kept shows up unchanged
        entry["model_response"] = "KEPT"
    out.write_text(json.dumps(first))
    second = evaluate(monkeypatch, tuned, out, "--num", "4")
    assert [entry["model_response"] for entry in second[:2]] == ["KEPT", "KEPT"]
    assert len(second) == 4 and "KEPT" not in [entry["model_response"] for entry in second[2:]]
    assert "(2 kept from an earlier run)" in capsys.readouterr().out

    sampled = evaluate(monkeypatch, tuned, out, "--num", "4", "--temperature", "1.0", "--seed", "7")  # other settings: answered anew
    assert "KEPT" not in [entry["model_response"] for entry in sampled]


def test_batched_answers_equal_one_by_one_answers(tuned, tmp_path, monkeypatch):
    one = evaluate(monkeypatch, tuned, tmp_path / "one.json", "--num", "6", "--batch-size", "1")
    batched = evaluate(monkeypatch, tuned, tmp_path / "batched.json", "--num", "6", "--batch-size", "4")
    assert [entry["model_response"] for entry in one] == [entry["model_response"] for entry in batched]
    assert any(entry["model_response"] for entry in one)  # the tuned model does say something


def test_evaluation_refuses_a_checkpoint_of_another_kind_and_finds_moved_data(tuned, tmp_path, monkeypatch, capsys):
    lm = tmp_path / "lm.pt"
    save_checkpoint(lm, GPTModel(MICRO_CONFIG), "lm")
    with pytest.raises(CheckpointError, match="is a 'lm' checkpoint, but this needs 'instruct'"):
        in_process(monkeypatch, "evaluate_responses", "--checkpoint", lm)

    moved = tmp_path / "moved.json"
    moved.write_text(tuned["data"].read_text())
    evaluate(monkeypatch, tuned, tmp_path / "r.json", "--data", moved, "--num", "1")
    assert "warning" not in capsys.readouterr().err  # the same content: the same split
    moved.write_text(json.dumps(json.loads(moved.read_text())[::-1]))
    evaluate(monkeypatch, tuned, tmp_path / "r.json", "--data", moved, "--num", "1")
    assert "differs from the file the model was tuned on" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the judge
class Judge(BaseHTTPRequestHandler):
    """POST /v1/chat/completions like OpenAI's API. The score depends on the answer judged; the first
    request is rate limited and the second fails with a 503, both with a short Retry-After."""

    replies = {"answer A": "85", "answer B": "Score: 70", "answer C": "90/100", "answer D": "I cannot rate this."}
    requests = []
    sampling = []  # what each request asked of the model besides the prompt
    failures = [429, 503]

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") != "Bearer good-key":
            return self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                              "code": "invalid_api_key"}})
        prompt = body["messages"][-1]["content"]
        judged = re.search(r"score the model response `(.*?)` on a scale", prompt, re.DOTALL)[1]
        Judge.requests.append(judged)
        Judge.sampling.append({key: body.get(key) for key in ("model", "temperature", "seed")})
        if Judge.failures:
            return self._send(Judge.failures.pop(0), {"error": {"message": "slow down"}}, {"Retry-After": "0.01"})
        self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": Judge.replies[judged]}}]})

    def _send(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url():
    Judge.requests, Judge.sampling, Judge.failures = [], [], [429, 503]
    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


@pytest.fixture
def responses(tmp_path):
    path = tmp_path / "responses.json"
    entries = [{"instruction": f"Task {letter}", "input": "", "output": f"correct {letter}", "model_response": f"answer {letter}"}
               for letter in "ABCD"]
    entries[1]["model response"] = entries[1].pop("model_response")  # the original's key
    path.write_text(json.dumps(entries))
    return path


def judge(responses, url, *extra):
    return ["--data", responses, "--out", responses.with_name("scores.json"), "--base-url", url,
            "--workers", "2", "--max-retries", "3", *extra]


def test_judge_scores_parses_loose_replies_retries_and_counts_the_unparsable(responses, judge_url, monkeypatch, capsys):
    result = run_script("gpt_eval.py", *judge(responses, judge_url), env={"OPENAI_API_KEY": "good-key"})
    assert result.stdout.strip().splitlines()[-1] == "Average score: 81.67"  # (85 + 70 + 90) / 3
    assert "3 of 4 answers scored by gpt-4o-mini, 1 unparsable" in result.stdout
    assert len(Judge.requests) == 6  # four answers, and the 429 and the 503 were retried
    assert all(asked == {"model": "gpt-4o-mini", "temperature": 0.0, "seed": 123} for asked in Judge.sampling)
    saved = json.loads(responses.with_name("scores.json").read_text())
    assert [entry["score"] for entry in saved["scores"]] == [85, 70, 90, None]
    assert saved["scores"][3]["judge_reply"] == "I cannot rate this." and saved["unparsable"] == 1
    assert saved["average_score"] == pytest.approx(245 / 3)

    Judge.requests = []
    monkeypatch.setenv("OPENAI_API_KEY", "good-key")
    in_process(monkeypatch, "gpt_eval", *judge(responses, judge_url))
    assert Judge.requests == ["answer D"]  # only the unparsable one is asked again
    output = capsys.readouterr().out
    assert "3 answers already scored" in output and output.strip().endswith("Average score: 81.67")


def test_rejected_or_missing_key_stops_at_once_with_a_clear_message(responses, judge_url, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "bad-key")
    with pytest.raises(UserError, match=r"rejected the API key \(401.*OPENAI_API_KEY"):
        in_process(monkeypatch, "gpt_eval", *judge(responses, judge_url))
    assert Judge.requests == [] and not responses.with_name("scores.json").exists()

    result = run_script("gpt_eval.py", "--data", responses, env={"OPENAI_API_KEY": ""}, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "OPENAI_API_KEY is not set" in result.stderr and "--base-url" in result.stderr


def test_unreachable_judge_and_missing_responses(responses, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "good-key")
    with pytest.raises(UserError, match="could not reach the judge at http://127.0.0.1:9/v1"):
        in_process(monkeypatch, "gpt_eval", *judge(responses, "http://127.0.0.1:9/v1", "--max-retries", "0"))
    with pytest.raises(UserError, match="make it with `python evaluate_responses.py`"):
        in_process(monkeypatch, "gpt_eval", *judge(tmp_path / "none.json", "http://127.0.0.1:9/v1"))


@pytest.mark.parametrize("reply, score", [
    ("85", 85), ("Score: 85", 85), ("85/100", 85), ("**92**", 92), ("8.5 out of 10", 85), ("4/5", 80),
    ("<think>maybe 20? no</think>\n75", 75), ("100", 100), ("0", 0),
    ("I cannot rate this.", None), ("150", None), ("-5", None), ("", None), (None, None),
])
def test_score_parsing(reply, score):
    assert parse_score(reply) == score


def test_lora_tuning_trains_adapters_only_and_saves_them_merged(tuned, tmp_path, monkeypatch, capsys):
    out = tmp_path / "lora.pt"
    in_process(monkeypatch, "fine_tune_instructional", "--data", tuned["data"], "--init", tuned["out"], "--out", out,
               "--lora-rank", "4", "--lora-alpha", "8", "--max-steps", "3", "--batch-size", "4",
               "--eval-batches", "1", "--lr", "1e-2", "--sample-tokens", "0")
    # Rank 4 adapters on qkv (32 -> 96), out (32 -> 32), expand (32 -> 128) and project (128 -> 32): 4 * (in + out) each.
    assert f"({4 * (32 + 96 + 32 + 32 + 32 + 128 + 128 + 32):,} trained)" in capsys.readouterr().out
    before, after = load_checkpoint(tuned["out"]), load_checkpoint(out, kinds=("instruct",))
    assert open_checkpoint(out).metadata["lora"] == {"rank": 4, "alpha": 8.0}
    assert torch.equal(after.token_embedding.weight, before.token_embedding.weight)  # frozen
    assert not torch.equal(after.blocks[0].attention.qkv_proj.weight, before.blocks[0].attention.qkv_proj.weight)

    # The saved (merged) model computes what the adapted model computed.
    last = read_checkpoint(out.with_suffix(".last.pt"))
    adapted = apply_lora(GPTModel(before.config), rank=4, alpha=8.0).eval()
    adapted.load_state_dict(last["train_state"]["lora_state_dict"])
    merged = load_checkpoint(out.with_suffix(".last.pt"))
    ids = torch.randint(0, 50257, (2, 20))
    assert (adapted(ids) - merged(ids)).abs().max() < 1e-4


"""The Streamlit app through streamlit's AppTest: every page, the checkpoint list, errors; the "Inside the
model" tab in test_app_inside_the_model.py, a real browser in test_app_browser.py."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app import GENERATION_DEFAULTS, find_checkpoints, plain_text_as_markdown
from modules.classification import classify
from modules.generation import stream_text
from modules.speed import auto_dtype
from modules.datasets.instructions import format_prompt
from tests.app_helpers import app_model, CLASSIFIER_SETTINGS, ROOT, save_classifier, save_lm, start_app

pytestmark = pytest.mark.slow  # not in the quick tier (python -m pytest -m "not slow")


def output_text(at):
    """The generated text, as the Markdown the app streamed."""
    [output] = at.markdown
    return output.value


def test_find_checkpoints_searches_recursively_and_skips_hidden_files(tmp_path):
    for name in ["b.pt", "runs/best.pt", "runs/last.pt", ".b.pt.tmp.pt", ".hidden/x.pt", "notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert find_checkpoints(tmp_path) == ["b.pt", str(Path("runs/best.pt")), str(Path("runs/last.pt"))]
    assert find_checkpoints(tmp_path / "missing") == []


def test_markdown_escaping_keeps_the_text_and_its_line_breaks():
    assert plain_text_as_markdown("# *a* [b](c) $1\nx") == r"\# \*a\* \[b\]\(c\) \$1" + "  \nx"


def test_no_checkpoint_says_what_to_run(tmp_path, monkeypatch):
    at = start_app(tmp_path, monkeypatch)
    assert "No checkpoint found" in at.info[0].value and str(tmp_path) in at.info[0].value
    assert "python train.py" in at.code[0].value
    assert "python get_gpt_weights.py --model 124M --save checkpoints/gpt2-124M.pt" in at.code[0].value
    assert not at.error and not at.button


def test_lm_streams_the_completion_of_a_long_non_ascii_prompt(tmp_path, monkeypatch):
    save_lm(tmp_path / "lm.pt")
    at = start_app(tmp_path, monkeypatch)
    assert at.header[0].value == "Text completion"
    prompt = "Héllo wörld 👋 — " * 20  # longer than the 64-token context: generate crops it
    at.slider(key="lm_tokens").set_value(15)
    at.number_input(key="lm_seed").set_value(7)
    at.text_area[0].input(prompt)
    at.button[0].click().run()
    assert not at.exception and not at.warning
    model = app_model(tmp_path / "lm.pt")
    # The sidebar's defaults (temperature 0.8, top-k 50) and the seed reach stream_text.
    completion = "".join(stream_text(model, prompt, 15, temperature=0.8, top_k=50, seed=7))
    assert completion and output_text(at) == plain_text_as_markdown(prompt + completion)


def test_instruct_answers_in_the_alpaca_format_and_stops_at_end_of_text(tmp_path, monkeypatch):
    save_lm(tmp_path / "instruct.pt", kind="instruct")
    at = start_app(tmp_path, monkeypatch)
    assert at.header[0].value == "Instruction following"
    at.slider(key="instruct_tokens").set_value(12)
    at.text_area[0].input("Name a colour 🎨.")
    at.text_area[1].input("")
    at.button[0].click().run()
    assert not at.exception
    entry = {"instruction": "Name a colour 🎨.", "input": ""}
    assert at.expander[0].text[0].value == format_prompt(entry).rstrip()  # st.text drops the final newline
    assert "### Input" not in format_prompt(entry)
    model = app_model(tmp_path / "instruct.pt")
    answer = "".join(stream_text(model, format_prompt(entry), 12))  # greedy by default; stops at <|endoftext|>
    assert output_text(at) == plain_text_as_markdown(answer).strip()  # st.markdown strips the ends


def test_classifier_shows_the_label_and_its_probability(tmp_path, monkeypatch):
    save_classifier(tmp_path / "spam.pt")
    at = start_app(tmp_path, monkeypatch)
    assert at.header[0].value == "Spam detector" and "ham, spam" in at.caption[1].value
    message = "WINNER!! Claim your prize ✨ " * 10  # longer than max_length (32 tokens): truncated
    at.text_area[0].input(message)
    at.button[0].click().run()
    assert not at.exception
    label, probability = classify(app_model(tmp_path / "spam.pt"), message, **CLASSIFIER_SETTINGS)
    assert label == "spam"
    assert [metric.value for metric in at.metric] == [label, f"{probability:.1%}"]


@pytest.mark.parametrize("save", [save_lm, save_classifier])
def test_empty_input_shows_a_warning(tmp_path, monkeypatch, save):
    save(tmp_path / "model.pt")
    at = start_app(tmp_path, monkeypatch)
    at.text_area[0].input("   \n")
    at.button[0].click().run()
    assert not at.exception and "first" in at.warning[0].value
    assert not at.metric and not at.markdown


def test_empty_instruction_shows_a_warning(tmp_path, monkeypatch):
    save_lm(tmp_path / "instruct.pt", kind="instruct")
    at = start_app(tmp_path, monkeypatch)
    at.text_area[0].input("")
    at.button[0].click().run()
    assert at.warning[0].value == "Type an instruction first." and not at.expander


def test_a_broken_checkpoint_shows_an_error_and_the_good_ones_keep_working(tmp_path, monkeypatch):
    save_lm(tmp_path / "a_lm.pt")
    save_classifier(tmp_path / "b_classifier.pt")
    (tmp_path / "broken.pt").write_bytes((tmp_path / "a_lm.pt").read_bytes()[:5000])  # truncated copy
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    at = start_app(tmp_path, monkeypatch)
    assert at.selectbox(key="checkpoint").options == ["a_lm.pt · lm", "b_classifier.pt · classifier",
                              "broken.pt · unreadable", "foreign.pt · unreadable"]
    at.selectbox(key="checkpoint").select("broken.pt").run()
    assert not at.exception and "broken.pt is not a readable checkpoint" in at.error[0].value
    at.selectbox(key="checkpoint").select("foreign.pt").run()
    assert not at.exception and "foreign.pt is a torch file but not a checkpoint of this project" in at.error[0].value
    at.selectbox(key="checkpoint").select("b_classifier.pt").run()
    at.text_area[0].input("Free entry in a weekly competition!")
    at.button[0].click().run()
    assert not at.exception and not at.error and at.metric[0].value == "spam"


def test_a_retrained_checkpoint_is_reloaded(tmp_path, monkeypatch):
    path = tmp_path / "lm.pt"
    save_lm(path, seed=0)
    at = start_app(tmp_path, monkeypatch)
    at.slider(key="lm_temperature").set_value(0.0)
    at.slider(key="lm_tokens").set_value(8)
    at.text_area[0].input("The")
    at.button[0].click().run()
    first = output_text(at)
    save_lm(path, seed=1)
    os.utime(path, ns=(time.time_ns() + 10**9,) * 2)  # a retraining's newer modification time
    at.button[0].click().run()
    second = output_text(at)
    assert first != second
    assert second == plain_text_as_markdown("The" + "".join(stream_text(app_model(path), "The", 8)))


def test_python_app_py_help_lists_the_flags():
    result = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--checkpoints-dir" in result.stdout and "streamlit run app.py" in result.stdout
    assert not result.stderr


def test_the_best_checkpoints_come_first_and_the_newest_opens(tmp_path, monkeypatch):
    """train.py writes pretrained.pt (the best model) and pretrained.last.pt (the resume file), and so on."""
    now = time.time_ns()  # one clock for all: writing a checkpoint can take seconds on a busy machine
    for age, name in enumerate(["broken.pt", "pretrained.last.pt", "pretrained.pt", "classifier.last.pt",
                                "classifier.pt"]):
        if name == "broken.pt":
            (tmp_path / name).write_bytes(b"not a checkpoint")
        else:
            (save_classifier if name.startswith("classifier") else save_lm)(tmp_path / name)
        os.utime(tmp_path / name, ns=(now - age * 10**9,) * 2)  # broken.pt is the newest
    at = start_app(tmp_path, monkeypatch)
    picker = at.selectbox(key="checkpoint")
    assert picker.options == ["broken.pt · unreadable", "classifier.pt · classifier", "pretrained.pt · lm"]
    assert picker.value == "pretrained.pt" and at.header[0].value == "Text completion"
    at.toggle(key="show_resume_files").set_value(True).run()
    assert at.selectbox(key="checkpoint").options[3:] == ["classifier.last.pt · classifier", "pretrained.last.pt · lm"]
    assert at.selectbox(key="checkpoint").value == "pretrained.pt"
    at.selectbox(key="checkpoint").select("classifier.last.pt").run()
    assert not at.exception and at.header[0].value == "Spam detector"


def test_resume_files_alone_are_listed_without_asking(tmp_path, monkeypatch):
    save_lm(tmp_path / "pretrained.last.pt")
    at = start_app(tmp_path, monkeypatch)
    assert at.selectbox(key="checkpoint").options == ["pretrained.last.pt · lm"] and not at.toggle
    assert at.header[0].value == "Text completion"


def test_the_default_precision_is_the_machines_native_one(tmp_path, monkeypatch):
    save_lm(tmp_path / "lm.pt")
    at = start_app(tmp_path, monkeypatch, flags=("--no-compile",))
    expected = str(auto_dtype("cpu")).removeprefix("torch.")
    assert at.caption[0].value.endswith(f"· cpu · {expected}")
    at.button[0].click().run()
    assert not at.exception and len(output_text(at)) > len("Every effort moves you")


def test_an_answer_encodes_its_prompt_once(tmp_path, monkeypatch):
    # The app counts the prompt's tokens (for the compiled step's length) and generates from those ids.
    import modules.generation
    import modules.tokenizer

    encoded = []

    def counting_encode(text, tokenizer=None, real=modules.tokenizer.encode):
        encoded.append(text)
        return real(text, tokenizer)

    monkeypatch.setattr(modules.tokenizer, "encode", counting_encode)
    monkeypatch.setattr(modules.generation, "encode", counting_encode)
    save_lm(tmp_path / "lm.pt")
    at = start_app(tmp_path, monkeypatch)
    at.text_area[0].input("Once upon a time")
    at.button[0].click().run()
    assert not at.exception and output_text(at).startswith("Once upon a time")
    assert encoded.count("Once upon a time") == 1, encoded


def test_the_step_is_compiled_in_the_background_once_per_model(tmp_path, monkeypatch):
    from modules.speed import CompiledDecoder

    builds = []
    monkeypatch.setattr(CompiledDecoder, "compile_in_background", lambda self, *shape: builds.append(shape))
    save_lm(tmp_path / "lm.pt")
    at = start_app(tmp_path, monkeypatch, flags=("--dtype", "float32"))  # compiled: the default
    at.run()  # a rerun (any click) must not start another
    assert builds == [(1, 64 + GENERATION_DEFAULTS["lm"]["max_new_tokens"])]
    at.button[0].click().run()  # the answer comes from the eager step while the build is not done
    assert not at.exception and "Answered by the eager step" in " ".join(caption.value for caption in at.caption)

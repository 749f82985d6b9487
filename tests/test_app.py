"""The Streamlit app: every page through streamlit's AppTest, and one run in a real headless Chromium."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from app import GENERATION_DEFAULTS, find_checkpoints, plain_text_as_markdown
from modules import GPTModel, GPT_CONFIGS
from modules.checkpoint import load_checkpoint, save_checkpoint
from modules.classification import classify
from modules.generation import stream_text
from modules.datasets.instructions import format_prompt

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {**GPT_CONFIGS["tiny"], "num_layers": 1, "context_size": 64}
TIMEOUT = 60  # seconds per script run; a run takes about one second


def save_lm(path, kind="lm", seed=0):
    torch.manual_seed(seed)
    save_checkpoint(path, GPTModel(CONFIG), kind, step=10)


def save_classifier(path):
    torch.manual_seed(0)
    model = GPTModel({**CONFIG, "num_classes": 2})
    with torch.no_grad():
        model.out_head.bias.copy_(torch.tensor([0.0, 3.0]))  # an untrained spam detector that says "spam"
    save_checkpoint(path, model, "classifier", label_names=["ham", "spam"], max_length=32)


def start_app(folder, monkeypatch):
    """The app as `streamlit run app.py -- --checkpoints-dir folder` starts it (AppTest runs it in this process)."""
    monkeypatch.setattr(sys, "argv", ["app.py", "--checkpoints-dir", str(folder)])
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    return at


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
    model = load_checkpoint(tmp_path / "lm.pt")
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
    model = load_checkpoint(tmp_path / "instruct.pt")
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
    label, probability = classify(load_checkpoint(tmp_path / "spam.pt"), message)
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
    assert second == plain_text_as_markdown("The" + "".join(stream_text(load_checkpoint(path), "The", 8)))


def test_python_app_py_help_lists_the_flags():
    result = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--checkpoints-dir" in result.stdout and "streamlit run app.py" in result.stdout
    assert not result.stderr


@pytest.fixture
def sync_playwright():
    """Playwright's sync API with Debian's Chromium, or a skip saying which is missing."""
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("no /usr/bin/chromium (apt-get install chromium) for the browser test")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        pytest.skip(f"playwright is not importable ({error}); pip install -r requirements-test.txt")
    return sync_playwright


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def app_server(tmp_path):
    """`streamlit run app.py` on a free port over tiny lm and classifier checkpoints; killed afterwards."""
    folder = tmp_path / "checkpoints"
    save_lm(folder / "lm.pt")
    save_classifier(folder / "spam.pt")
    port = free_port()
    log = open(tmp_path / "streamlit.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--server.fileWatcherType", "none",
         "--", "--checkpoints-dir", str(folder)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as response:
                    if response.read() == b"ok":
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "streamlit.log").read_text()
            assert time.monotonic() < deadline, "streamlit did not answer in 30 s"
            time.sleep(0.2)
        yield url, folder
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_in_a_real_browser(sync_playwright, app_server, tmp_path):  # skips before the server starts
    url, folder = app_server
    prompt = "Every effort moves you 🙂"
    completion = "".join(stream_text(load_checkpoint(folder / "lm.pt"), prompt, **GENERATION_DEFAULTS["lm"], seed=3))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(20_000)
            page.goto(url)
            page.get_by_text("Text completion").wait_for()
            seed = page.get_by_role("spinbutton", name="Seed")
            seed.fill("3")
            seed.press("Enter")
            page.get_by_label("Prompt", exact=True).fill(prompt)
            page.get_by_role("button", name="Generate").click()
            output = page.locator(".st-key-output")
            output.wait_for()
            expected = " ".join((prompt + completion).split())
            try:
                page.wait_for_function(
                    "expected => { const e = document.querySelector('.st-key-output');"
                    " return e && e.innerText.split(/\\s+/).join(' ').trim() === expected; }",
                    arg=expected,
                )
            except Exception:
                raise AssertionError(f"expected {expected!r}, the page shows {output.inner_text()!r}")
            page.screenshot(path=tmp_path / "app-lm.png", full_page=True)

            page.get_by_label("Checkpoint").click()  # Streamlit's selectbox opens a list of options
            page.get_by_role("option", name="spam.pt · classifier").click()
            page.get_by_text("Spam detector").wait_for()
            page.get_by_label("Message", exact=True).fill("Congratulations! You won a free cruise, call now")
            page.get_by_role("button", name="Classify").click()
            verdict = page.locator('[data-testid="stMetricValue"]').first
            verdict.wait_for()
            assert verdict.inner_text() == "spam"
            page.screenshot(path=tmp_path / "app-classifier.png", full_page=True)
            assert "Traceback" not in (tmp_path / "streamlit.log").read_text()
            print(f"screenshots: {tmp_path / 'app-lm.png'}, {tmp_path / 'app-classifier.png'}")
        finally:
            browser.close()


"""What the app's tests share: tiny checkpoints, the app under AppTest, and the app served to a real
browser (also used by tests/make_app_screenshot.py)."""
import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
from streamlit.testing.v1 import AppTest

from modules import GPTModel, GPT_CONFIGS
from modules.checkpoint import load_checkpoint, save_checkpoint
from modules.speed import prepare_for_generation
from tests.conftest import REPO as ROOT

CONFIG = {**GPT_CONFIGS["tiny"], "num_layers": 1, "context_size": 64}
TIMEOUT = 60  # seconds per script run; a run takes about one second
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def save_lm(path, kind="lm", seed=0, config=CONFIG):
    torch.manual_seed(seed)
    save_checkpoint(path, GPTModel(config), kind, step=10)


CLASSIFIER_SETTINGS = {"label_names": ["ham", "spam"], "max_length": 32}  # what save_classifier stores


def save_classifier(path):
    torch.manual_seed(0)
    model = GPTModel({**CONFIG, "num_classes": 2})
    with torch.no_grad():
        model.out_head.bias.copy_(torch.tensor([0.0, 3.0]))  # an untrained spam detector that says "spam"
    save_checkpoint(path, model, "classifier", **CLASSIFIER_SETTINGS)


# The tests compare what the app shows with what the model computes in float32 with the eager step; the
# defaults, bfloat16 where the machine computes it natively and the step compiled in the background, have
# tests of their own.
EXACT = ("--dtype", "float32", "--no-compile")


def app_model(path):
    """The model at `path` as the app started with EXACT runs it, computing the same numbers."""
    return prepare_for_generation(load_checkpoint(path), EXACT[1])


def start_app(folder, monkeypatch, flags=EXACT):
    """The app as `streamlit run app.py -- --checkpoints-dir folder FLAGS` starts it (AppTest runs it in this
    process)."""
    monkeypatch.setattr(sys, "argv", ["app.py", "--checkpoints-dir", str(folder), *flags])
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    return at


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served_app(folder, log_path, started=None, flags=EXACT):
    """`streamlit run app.py -- FLAGS` on a free port over the checkpoints in `folder`; yields its URL, stops
    it after.
    The server's Popen is appended to the list `started`, if given, for a test that watches the process.

    It runs in the folder above `folder`, so that the page names the checkpoints as a user's app would
    (`checkpoints/pretrained.pt`)."""
    port = free_port()
    folder = Path(folder)
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true", "--server.fileWatcherType", "none",
             "--", "--checkpoints-dir", folder.name, *flags],
            cwd=folder.parent, stdout=log, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        if started is not None:
            started.append(server)
        try:
            wait_until_healthy(url, server, log_path)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def wait_until_healthy(url, server, log_path, seconds=30):
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as response:
                if response.read() == b"ok":
                    return
        except OSError:
            pass
        assert server.poll() is None, Path(log_path).read_text()
        assert time.monotonic() < deadline, f"streamlit did not answer in {seconds} s"
        time.sleep(0.2)


def launch_chromium(playwright):
    """Debian's headless Chromium (playwright cannot download its own here)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)


@contextlib.contextmanager
def app_page(playwright, url, width, height, timeout_ms):
    """A Chromium page of `width` x `height` pixels on the app at `url`, once its language-model page is
    shown; `timeout_ms` is how long each step may wait. The browser is closed afterwards."""
    browser = launch_chromium(playwright)
    try:
        page = browser.new_page(viewport={"width": width, "height": height})
        page.set_default_timeout(timeout_ms)
        page.goto(url)
        page.get_by_text("Text completion").wait_for()
        yield page
    finally:
        browser.close()


def open_inside_the_model(page):
    """Open the "Inside the model" tab and wait until its last chart is drawn."""
    page.get_by_role("tab", name="Inside the model").click()
    panel = page.get_by_role("tabpanel")
    panel.get_by_text("1. The tokens").wait_for()
    panel.locator('[data-testid="stVegaLiteChart"]').last.locator("canvas, svg").first.wait_for()

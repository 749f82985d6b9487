"""The app in a real headless Chromium: it opens on the best checkpoint, generates, shows the "Inside the
model" tab, classifies, and serves two sessions at once."""
import os
import time
from pathlib import Path

import pytest

from app import GENERATION_DEFAULTS
from modules.checkpoint import load_checkpoint
from modules.generation import stream_text
from tests.app_helpers import (CHROMIUM, app_page, launch_chromium, open_inside_the_model, save_classifier, save_lm,
                               served_app)

pytestmark = pytest.mark.slow  # not in the quick tier (python -m pytest -m "not slow")

# How long a step may wait: a 2-core machine busy with the server and two browsers can take tens of
# seconds for what is otherwise instant.
BROWSER_TIMEOUT_MS = 90_000

PROMPT = "Every effort moves you 🙂"


@pytest.fixture
def sync_playwright():
    """Playwright's sync API with Debian's Chromium, or a skip saying which is missing."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium) for the browser test")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        pytest.skip(f"playwright is not importable ({error}); pip install -r requirements-test.txt")
    return sync_playwright


@pytest.fixture
def app_url(tmp_path):
    """The app over a training run's files (the best model, its newer resume file) and an older classifier."""
    folder = tmp_path / "checkpoints"
    save_classifier(folder / "spam.pt")
    save_lm(folder / "pretrained.pt")
    save_lm(folder / "pretrained.last.pt", seed=1)
    os.utime(folder / "spam.pt", ns=(time.time_ns() - 10**9,) * 2)
    with served_app(folder, tmp_path / "streamlit.log") as url:
        yield url, folder


def completion(folder, seed):
    model = load_checkpoint(folder / "pretrained.pt")
    return "".join(stream_text(model, PROMPT, **GENERATION_DEFAULTS["lm"], seed=seed))


def start_generating(page, seed):
    seed_input = page.get_by_role("spinbutton", name="Seed")
    seed_input.fill(str(seed))
    seed_input.press("Enter")
    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    page.get_by_role("button", name="Generate").click()


def wait_for_output(page, expected):
    """Wait until the output box holds `expected` (whitespace aside); a clear message if it never does."""
    expected = " ".join(expected.split())
    try:
        page.wait_for_function(
            "expected => { const e = document.querySelector('.st-key-output');"
            " return e && e.innerText.split(/\\s+/).join(' ').trim() === expected; }",
            arg=expected,
        )
    except Exception:
        shown = page.locator(".st-key-output").all_inner_texts()
        raise AssertionError(f"expected {expected!r}, the page shows {shown!r}") from None


def test_in_a_real_browser(sync_playwright, app_url, tmp_path):  # skips before the server starts
    url, folder = app_url
    with sync_playwright() as playwright, app_page(playwright, url, width=1280, height=900, timeout_ms=BROWSER_TIMEOUT_MS) as page:
        assert page.get_by_label("Checkpoint").input_value() == "pretrained.pt · lm"
        start_generating(page, seed=3)
        wait_for_output(page, PROMPT + completion(folder, seed=3))
        page.screenshot(path=tmp_path / "app-lm.png", full_page=True)

        open_inside_the_model(page)
        charts = page.get_by_role("tabpanel").locator('[data-testid="stVegaLiteChart"]')
        assert charts.count() == 2  # the next token's probabilities, the attention map
        page.get_by_role("button", name="Append a token").click()
        page.get_by_role("button", name="Back to the prompt").wait_for()
        page.screenshot(path=tmp_path / "app-inside-the-model.png", full_page=True)

        page.get_by_label("Checkpoint").click()  # Streamlit's selectbox opens a list of options
        page.get_by_role("option", name="spam.pt · classifier").click()
        page.get_by_text("Spam detector").wait_for()
        page.get_by_label("Message", exact=True).fill("Congratulations! You won a free cruise, call now")
        page.get_by_role("tab", name="Classify").click()
        page.get_by_role("button", name="Classify").click()
        verdict = page.locator('[data-testid="stMetricValue"]').first
        verdict.wait_for()
        assert verdict.inner_text() == "spam"
        page.screenshot(path=tmp_path / "app-classifier.png", full_page=True)
        assert "Traceback" not in (tmp_path / "streamlit.log").read_text()
        print(f"screenshots in {tmp_path}")


def test_two_sessions_at_once(sync_playwright, app_url, tmp_path):
    """Two users load the model, generate and inspect at the same time; each gets their own text."""
    url, folder = app_url
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            pages = [browser.new_context().new_page() for _ in range(2)]
            for page in pages:
                page.set_default_timeout(BROWSER_TIMEOUT_MS)
                page.goto(url)  # returns when the page has loaded, before its script has run: both start together
            for page in pages:
                page.get_by_text("Text completion").wait_for()
            for seed, page in enumerate(pages):
                start_generating(page, seed)
            for seed, page in enumerate(pages):
                wait_for_output(page, PROMPT + completion(folder, seed))

            start_generating(pages[0], seed=5)  # one generates while the other inspects
            open_inside_the_model(pages[1])
            wait_for_output(pages[0], PROMPT + completion(folder, seed=5))
            assert "Traceback" not in (tmp_path / "streamlit.log").read_text()
        finally:
            browser.close()

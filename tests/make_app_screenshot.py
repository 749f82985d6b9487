"""Make the README's picture of the app's "Inside the model" tab, docs/app-inside-the-model.png:

    python -m tests.make_app_screenshot            # about 5 minutes on 2 CPU cores

A random model would show noise, so the `tiny` GPT is first pretrained briefly on the bundled corpus
(train.py --max-steps); then the app is served over its checkpoints and Chromium photographs the tab.
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

from tests.app_helpers import ROOT, app_page, open_inside_the_model, served_app

PROMPT = "To be, or not to be, that is the"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "app-inside-the-model.png")
    parser.add_argument("--steps", type=int, default=150, help="training steps (default: %(default)s)")
    return parser.parse_args()


def pretrain(folder, steps):
    """checkpoints/pretrained.pt (and .last.pt) under `folder`: `steps` steps of 16 windows of 64 tokens."""
    subprocess.run([sys.executable, "train.py", "--max-steps", str(steps), "--context-size", "64", "--batch-size", "16",
                    "--lr", "3e-3", "--eval-interval", str(steps), "--eval-batches", "4", "--sample-tokens", "0",
                    "--out", str(folder / "checkpoints" / "pretrained.pt")], cwd=ROOT, check=True)


def photograph_the_tab(folder, path):
    """A PNG of the app's main column with the tab open on PROMPT, as the app shows it at 1100 pixels wide."""
    with served_app(folder / "checkpoints", folder / "streamlit.log") as url, sync_playwright() as playwright, \
            app_page(playwright, url, width=1100, height=2400, timeout_ms=60_000) as page:
        page.get_by_label("Prompt", exact=True).fill(PROMPT)
        open_inside_the_model(page)
        page.wait_for_timeout(1000)  # the charts' fade-in
        main = page.locator('[data-testid="stMainBlockContainer"]').bounding_box()
        top = page.get_by_role("heading", name="Text completion").bounding_box()["y"] - 16
        bottom = page.get_by_role("tabpanel").bounding_box()
        height = bottom["y"] + bottom["height"] + 16 - top
        page.screenshot(path=path, clip={"x": main["x"], "y": top, "width": main["width"], "height": height})


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        pretrain(folder, args.steps)
        photograph_the_tab(folder, folder / "screenshot.png")
        # 256 colours are plenty for charts on white, and make the file several times smaller.
        Image.open(folder / "screenshot.png").convert("RGB").quantize(colors=256).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Installs what this project needs on a fresh machine. `./setup.sh --test` adds the test tools.
set -euo pipefail
cd "$(dirname "$0")"
PIP="python -m pip install --quiet --disable-pip-version-check"

# Without torch, an unpinned install pulls a multi-GB CUDA build; 2.13.0 is the tested release.
if ! python -c "import torch" 2>/dev/null; then
    $PIP torch==2.13.0
fi
$PIP -r requirements.txt

if [ "${1:-}" = "--test" ]; then
    $PIP -r requirements-test.txt
    # The app's browser test drives Debian's Chromium (playwright cannot download its own here).
    if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
            || echo "setup.sh: could not install chromium; the browser test will be skipped"
    fi
fi

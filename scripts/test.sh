#!/usr/bin/env bash
# The whole test suite, from a fresh machine: set up .venv, lint, then every test, including the
# real-model ones (the default model is pulled into ~/.cache/qwenlm on first use, ~0.5 GB).
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -m "not real_model"   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# The web-page tests drive Debian's Chromium through Playwright (never a downloaded browser).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } ||
    echo "warning: could not install chromium; the web-page tests will be skipped" >&2
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q --durations=15 "$@"

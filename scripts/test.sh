#!/usr/bin/env bash
# The whole test suite, from a fresh machine: set up .venv, lint, then every test, including the
# real-model ones (the default model is pulled into ~/.cache/qwenlm on first use, ~0.5 GB).
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -m "not real_model"   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q --durations=15 "$@"

#!/usr/bin/env bash
# Create .venv and install qwenlm into it. Needs only python3 (3.11+) and network access to PyPI.
#   bash scripts/setup.sh          # qwenlm itself
#   bash scripts/setup.sh test     # plus what the test suite needs (transformers, pytest, ruff, ...)
# An existing torch in .venv is kept (install a CUDA build first if you want one); otherwise
# torch==$QWENLM_TORCH (default 2.13.0) is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "installing torch==${QWENLM_TORCH:-2.13.0} ..." >&2
  .venv/bin/python -m pip install -q "torch==${QWENLM_TORCH:-2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
fi
extra=""
if [ "${1:-}" = "test" ]; then extra="[test]"; fi
echo "installing qwenlm${extra} ..." >&2
.venv/bin/python -m pip install -q -e ".${extra}" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import qwenlm, torch; print(f'qwenlm {qwenlm.__version__} with torch {torch.__version__} in .venv')" >&2

#!/usr/bin/env bash
# What benchmarks/compare.py needs beside qwenlm's test extras (which bring transformers,
# matplotlib and the prebuilt ik-llama-cpp-python wheel): mainline llama.cpp through
# llama-cpp-python, compiled from source (~15 minutes on 2 cores; pip caches the wheel), or a
# wheel built before:  LLAMA_CPP_WHEEL=/path/llama_cpp_python-0.3.36-*.whl bash benchmarks/setup.sh
# ik_llama.cpp's native llama-bench: bash benchmarks/build_ik_llama.sh SOURCE_DIR (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if [ -n "${LLAMA_CPP_WHEEL:-}" ]; then
    .venv/bin/python -m pip install "$LLAMA_CPP_WHEEL" matplotlib
else
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} .venv/bin/python -m pip install "llama-cpp-python==0.3.36" matplotlib
fi

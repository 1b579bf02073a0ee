#!/usr/bin/env bash
# What benchmarks/compare.py needs beside qwenlm's test extras: llama.cpp through
# llama-cpp-python (compiled from source: ~15 minutes on 2 cores; pip caches the wheel) and
# matplotlib for the chart.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} .venv/bin/python -m pip install "llama-cpp-python==0.3.36" matplotlib

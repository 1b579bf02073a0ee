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
elif grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
    # On CPUs with AMX (Sapphire Rapids and later) llama.cpp 0.3.36 puts Q8_0/Q4_K/Q6_K
    # weights in its AMX buffer and crashes (SIGSEGV) on the first evaluation of the default
    # model. Its native build enables AMX from -march=native (GGML_AMX=OFF does not stop
    # that); explicit -mno-amx-* flags win over -march=native in GCC, and it then runs its
    # AVX-512 kernels. (Backslashed spaces: scikit-build-core splits CMAKE_ARGS like a shell.)
    # --no-cache-dir: pip's cache would hand back a wheel built with other flags.
    noamx='-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16'
    CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_C_FLAGS=$noamx -DCMAKE_CXX_FLAGS=$noamx" \
        CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
        .venv/bin/python -m pip install --no-cache-dir "llama-cpp-python==0.3.36" matplotlib
else
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} .venv/bin/python -m pip install "llama-cpp-python==0.3.36" matplotlib
fi

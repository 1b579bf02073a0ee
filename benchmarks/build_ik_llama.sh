#!/usr/bin/env bash
# Builds ik_llama.cpp's llama-bench for benchmarks/compare.py (--ik-llama-bench PATH).
#
#   bash benchmarks/build_ik_llama.sh SOURCE_DIR [BUILD_DIR]
#
# SOURCE_DIR is a checkout of https://github.com/ikawrakow/ik_llama.cpp (its public source;
# nothing of it enters this repository). The build is native (-DGGML_NATIVE=ON: -march=native,
# so the kernels use every vector extension of this CPU) and static, and makes only the
# llama-bench target; it prints the binary's path last. BUILD_DIR defaults to SOURCE_DIR/build.
# It took 1 h 45 min on 2 cores shared with other jobs: CMAKE_BUILD_PARALLEL_LEVEL sets the jobs
# (default: all cores).
set -euo pipefail
if [ $# -lt 1 ] || [ ! -f "$1/CMakeLists.txt" ] || [ ! -d "$1/examples/llama-bench" ]; then
    echo "usage: bash benchmarks/build_ik_llama.sh SOURCE_DIR [BUILD_DIR]" >&2
    echo "SOURCE_DIR must be an ik_llama.cpp checkout (git clone https://github.com/ikawrakow/ik_llama.cpp)" >&2
    exit 2
fi
src=$(cd "$1" && pwd)
build=${2:-$src/build}
# GGML_IQK_FA_ALL_QUANTS only adds flash-attention kernels for quantized KV caches, which the
# benchmark does not use (f16 cache); leaving them out roughly halves the compile time.
cmake -S "$src" -B "$build" -G "$(command -v ninja >/dev/null && echo Ninja || echo 'Unix Makefiles')" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_IQK_FA_ALL_QUANTS=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=OFF
cmake --build "$build" --target llama-bench --parallel "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
bin=$(find "$build" -name llama-bench -type f -perm -u+x | head -n 1)
if [ -z "$bin" ]; then
    echo "the build finished without a llama-bench binary under $build" >&2
    exit 1
fi
echo "$bin"

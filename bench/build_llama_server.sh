#!/usr/bin/env bash
# Builds llama.cpp's llama-server from the llama.cpp source inside the llama-cpp-python sdist
# (the same llama.cpp the tests compare against), for bench/serve_load.py --llama-server.
#   bash bench/build_llama_server.sh [WORKDIR]     -> WORKDIR/build/bin/llama-server
set -euo pipefail
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
work="${1:-${TMPDIR:-/tmp}/llama-server-$version}"
mkdir -p "$work"
cd "$work"
if [ ! -f "llama_cpp_python-$version.tar.gz" ]; then
  python -m pip download --no-deps --no-binary llama-cpp-python -d . "llama-cpp-python==$version"
fi
if [ ! -d "llama_cpp_python-$version" ]; then
  tar xzf "llama_cpp_python-$version.tar.gz"
fi
src="llama_cpp_python-$version/vendor/llama.cpp"
# Without llama.cpp's AMX products, which crash in this version on CPUs that have AMX (.ci/run says more).
no_amx=""
grep -qw amx_tile /proc/cpuinfo && no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$src" -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx"
cmake --build build --target llama-server -j "$(nproc)"
echo "$work/build/bin/llama-server"

#!/usr/bin/env bash
# Builds the pinned llama.cpp engine (llama-cpp-python 0.3.36, which vendors llama.cpp 0c1e57098) from its sdist,
# CPU only, into its own cached venv -- never the project's .venv -- and prints that venv's python:
#
#   bash scripts/install-llamacpp.sh        # first run: a C/C++ build (minutes); later runs: reuse, seconds
#
# WKVQ_ENGINE_CACHE moves the cache (default ~/.cache/wkvq/engines). CMAKE_BUILD_PARALLEL_LEVEL caps the build's jobs.
# tests/test_engine_llamacpp.py and benchmarks/engine_llamacpp.py use this venv when it exists.
set -euo pipefail
version=0.3.36
sdist_sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
dir=${WKVQ_ENGINE_CACHE:-$HOME/.cache/wkvq/engines}/llama-cpp-python-$version
python=$dir/venv/bin/python

if [ -f "$dir/complete" ] && "$python" -c 'import llama_cpp' 2>/dev/null; then
    echo "$python"
    exit 0
fi

fail() { echo "install-llamacpp: $*" >&2; exit 1; }
command -v python3 >/dev/null || fail "python3 is needed"
for tool in cc c++; do
    command -v $tool >/dev/null || fail "no '$tool': install a C and C++ compiler (e.g. the build-essential package)"
done
command -v cmake >/dev/null || echo "install-llamacpp: no system cmake; the build fetches one" >&2

rm -rf "$dir"
mkdir -p "$dir/sdist"
python3 -m venv "$dir/venv" || fail "python3 -m venv failed: install the venv module (e.g. python3-venv)"
"$python" -m pip download -q --no-binary :all: --no-deps -d "$dir/sdist" "llama-cpp-python==$version" \
    || fail "could not download the llama-cpp-python $version sdist"
sdist=$(ls "$dir"/sdist/llama_cpp_python-$version.tar.gz)
echo "$sdist_sha256  $sdist" | sha256sum -c --quiet - || fail "sha256 mismatch for $sdist"

# CPU only (no GPU backend is enabled by default); no multimodal (mtmd) library, the driver does not use it.
export CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF"
start=$SECONDS
if ! "$python" -m pip install -q "$sdist" > "$dir/build.log" 2>&1; then
    tail -n 30 "$dir/build.log" >&2
    fail "building llama-cpp-python $version failed (log: $dir/build.log). It needs a C/C++ compiler (gcc/g++ or" \
         "clang, e.g. the build-essential package), cmake >= 3.21 and ninja or make (pip fetches them if absent)."
fi
"$python" -c 'import llama_cpp' || fail "llama_cpp does not import after the build (log: $dir/build.log)"
echo "install-llamacpp: built in $((SECONDS - start)) s" >&2
touch "$dir/complete"
echo "$python"

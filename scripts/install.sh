#!/usr/bin/env bash
# Creates .venv (when missing) and installs the project with its locked dependencies:
#
#   bash scripts/install.sh                           # requirements/dev.txt: everything (development, tests)
#   bash scripts/install.sh requirements/service.txt  # the service alone
#
# First torch, at the version pyproject.toml pins (pip picks this machine's build: CPU or CUDA), then every other
# dependency at its locked version with its sha256 checked, then the project itself (editable, nothing resolved).
set -euo pipefail
cd "$(dirname "$0")/.."
lock=${1:-requirements/dev.txt}
[ -x .venv/bin/python ] || python3 -m venv .venv
torch=$(.venv/bin/python -c 'import tomllib; print(next(d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] if d.startswith("torch")))')
.venv/bin/pip install -q "$torch"
.venv/bin/pip install -q --require-hashes -r "$lock"
.venv/bin/pip install -q --no-deps --no-build-isolation -e .

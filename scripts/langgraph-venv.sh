#!/usr/bin/env bash
# LangGraph's own server (`langgraph dev`) in its own virtual environment, .venv-langgraph, as
# in production, where LangGraph Server is a separate deployment. It cannot share .venv:
# langgraph-api (0.16.7) requires jsonschema-rs<0.45 and schemathesis (>=4.32, dev extra)
# requires jsonschema-rs>=0.60.1. Installs relay-agents' core (all the graphs of langgraph.json
# import) with the langgraph-server extra. A completed environment is reused while
# pyproject.toml is unchanged, and made again when it changed or an earlier run stopped halfway.
#   bash scripts/langgraph-venv.sh   # prints the environment's `langgraph` on stdout
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-langgraph
step() { printf '==> %s\n' "$*" >&2; }
made_from=$(sha256sum pyproject.toml)
if [ "$(cat "$VENV/.complete" 2>/dev/null)" != "$made_from" ]; then
  rm -rf "$VENV"
  step "creating $VENV with relay-agents[langgraph-server] (langgraph-cli[inmem]; a few minutes)"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -e ".[langgraph-server]" >&2
  echo "$made_from" >"$VENV/.complete"
fi
echo "$PWD/$VENV/bin/langgraph"

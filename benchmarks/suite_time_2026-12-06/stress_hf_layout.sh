#!/usr/bin/env bash
# The streamed-against-in-memory merge tests, bit for bit, run N times under the classic emitters (the flag the
# suite does not adopt), each run logged to /tmp/stress_TAG_i.log; two of these in parallel = the two workers.
# usage: bash benchmarks/suite_time_2026-12-06/stress_hf_layout.sh TAG N "EXTRA_FLAGS"
cd "$(dirname "$0")/../.."
source .venv/bin/activate
FLAGS="--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0"
FLAGS="$FLAGS --xla_cpu_use_fusion_emitters=false $3"
for i in $(seq 1 $2); do
  XLA_FLAGS="$FLAGS" python -m pytest -q -p no:cacheprovider --runslow tests/ops/merge/test_hf_layout.py \
    -k bit_for_bit > /tmp/stress_$1_$i.log 2>&1
  echo "$i rc=$? $(tail -1 /tmp/stress_$1_$i.log)"
done

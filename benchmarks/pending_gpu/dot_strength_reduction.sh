# Issues 13 and 14: batch-1 decode with XLA's dot strength reduction off. XLA's GPU simplifier rewrites a dot whose
# operands hold fewer than 10M elements in all (xla/service/gpu/gpu_algebraic_simplifier.cc,
# IsMatrixMultiplicationTooSmallForRewriting) into multiply + reduce: at the 1B shape the fused q/k/v (2048 x 3072)
# and o_proj (2048 x 2048) projections, whose reduction kernels read at ~0.8 and ~1.2 TB/s in the 2026-12-05 H100
# profiles, while gate/up (2048 x 16384) and down (8192 x 2048) stay GEMM fusions at ~2.5 TB/s. Each row set is its
# own process (XLA_FLAGS is read at start-up): bench_generate at 135M and 1B, batch 1, and bench_sparse_decode at
# top 4, with and without --xla_gpu_enable_dot_strength_reduction=false, each profiled. ~6 min, machine warm.
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
OFF=--xla_gpu_enable_dot_strength_reduction=false
for flags in "" "$OFF"; do
  tag=${flags:+off}; tag=${tag:-on}
  XLA_FLAGS="$flags" timeout 150 python3 scripts/bench_generate.py --shape 135m,1b --batch 1 --repeats 3 --profile /tmp/gp_$tag --out $OUT/generate_$tag.jsonl > $OUT/generate_$tag.log 2>&1; el generate_$tag $?
  XLA_FLAGS="$flags" timeout 150 python3 scripts/bench_sparse_decode.py --shape 1b --top_k 4 --new_tokens 256 --repeats 5 --modes pallas --profile /tmp/sp_$tag --out $OUT/sparse_$tag.jsonl > $OUT/sparse_$tag.log 2>&1; el sparse_$tag $?
done
for f in $OUT/generate_*.jsonl $OUT/sparse_*.jsonl; do echo "== $f"; python3 -c "
import json, sys
for line in open('$f'):
    r = json.loads(line)
    if 'step_ms' in r: print(r.get('shape'), r.get('row', ''), r.get('batch'), 'step_ms', round(r['step_ms'], 3), 'tokens_per_s', round(r['tokens_per_s'], 1))
    if 'events_per_step' in r or 'profile' in r: print('  kernels/step', (r.get('profile') or r).get('events_per_step'))
"; done

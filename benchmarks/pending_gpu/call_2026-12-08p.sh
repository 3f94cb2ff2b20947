# A short call for a small budget ("p" session; carry .gpu/whl; ~5 min): on an H200 the one-token atomic short call
# (issue 14's kernel-only merge rows, issue 13's top-4 sparse decode); on another card bench_merge's kernel-only rows
# on this tree with slerp's depth gradient added (one compiled kernel per shape since a6caedd, batched over layers).
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  bash benchmarks/one_token_atomic_2026-12-06/short.sh
else
  source benchmarks/pending_gpu/env.sh
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
  timeout 240 python3 scripts/bench_merge.py --workdir /tmp/bm --size 1b --device gpu --kernels_only --methods linear,task_arithmetic,ties,slerp --kernel_iters 10 --out $OUT/kernels_only.json > $OUT/kernels_only.log 2>&1; el kernels_only $?; grep kernel_ $OUT/kernels_only.log | cut -c1-250
fi

# The shortest useful H200 call (carry .gpu/whl; ~4 min): bench_merge's kernel-only rows for linear and
# task_arithmetic on this tree (issue 14's >= 50% of the HBM bound), then issue 13's top-4 sparse decode with the out
# kernel's atomic adds against the dense model in the same process (the ratio; SETS adds option sets).
[ -n "$ANY_GPU" ] || nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 || exit 3  # ANY_GPU=1: any card
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
timeout 110 python3 scripts/bench_merge.py --workdir /tmp/bm --size 1b --device gpu --kernels_only --methods linear,task_arithmetic --kernel_iters 10 --out $OUT/kernels_only.json > $OUT/kernels_only.log 2>&1; el kernels_only $?; grep kernel_ $OUT/kernels_only.log | cut -c1-250
timeout 150 python3 scripts/bench_sparse_decode.py --shape 1b --new_tokens 256 --repeats 3 --modes pallas --top_k 4 --pallas "${SETS:-atomic=1}" --out $OUT/sweep.jsonl > $OUT/sweep.log 2>&1; el sweep $?
grep -v '^{' $OUT/sweep.log | grep -v "^  " | tail -6 | cut -c1-200

# Issue 14's end-to-end GPU merge (goal: >= 70% of the read bandwidth measured in the same run) on the current tree,
# after the ties selection's 7 counts a pass (kernel-only ties 63 ms batched): bench_merge's end-to-end rows for
# linear, task_arithmetic and ties, two repeats each, its page-cache read bandwidth and kernel-only rows. Any card;
# carry .gpu/whl. From the repository root:  bash benchmarks/pending_gpu/merge_e2e.sh   (timeout_s 560; ~5-7 min)
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
timeout 480 python3 scripts/bench_merge.py --workdir /tmp/bm --size 1b --device gpu --methods linear,task_arithmetic,ties \
  --tools ours --repeats 2 --kernel_iters 5 --out $OUT/bench_merge_e2e.json > $OUT/e2e.log 2>&1; el e2e $?
grep -v '^\s*$' $OUT/e2e.log | tail -30 | cut -c1-260

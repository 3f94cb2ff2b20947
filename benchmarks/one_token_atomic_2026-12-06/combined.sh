# One call on an H200 when little device time is left (carry .gpu/whl, .gpu/anchors; ~9 min, each part bounded):
# bench_merge's kernel-only rows on this tree (issue 14's >= 50% of the HBM bound), issue 13's top-4 sparse decode
# with the out kernel's atomic adds and a wider output tile (sweep.sh's sets, fewer), then issue 14's 135M decode
# with the atomic residual against the XLA sums and the anchor.
[ -n "$ANY_GPU" ] || nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 || exit 3  # ANY_GPU=1: any card
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
timeout 150 python3 scripts/bench_merge.py --workdir /tmp/bm --size 1b --device gpu --kernels_only --methods linear,task_arithmetic --kernel_iters 10 --out $OUT/kernels_only.json > $OUT/kernels_only.log 2>&1; el kernels_only $?; grep kernel_ $OUT/kernels_only.log | cut -c1-250
timeout 230 python3 scripts/bench_sparse_decode.py --shape 1b --new_tokens 256 --repeats 3 --modes pallas --top_k 4 --profile /tmp/prof --pallas "route=1;atomic=1;token_out=128;atomic=1,token_out=128" --out $OUT/sweep.jsonl > $OUT/sweep.log 2>&1; el sweep $?
grep -v '^{' $OUT/sweep.log | grep -v "^  " | tail -8 | cut -c1-200; grep "^  .*moe_" $OUT/sweep.log | cut -c1-120
timeout 150 python3 scripts/bench_generate.py --shape 135m --batch 1 --repeats 3 --one_token 1,residual_atomic=0 --anchor .gpu/anchors/hf_generate.py --anchor_modes static --out $OUT/atomic.jsonl > $OUT/atomic.log 2>&1; el atomic $?
python3 benchmarks/one_token_h100_2026-12-05/summary.py $OUT/atomic.jsonl

# One call (carry .gpu/whl; kind nvidia-h200, ~8 min): issue 13's decode speed-up on the H200 (1.25x at top 4 of 16
# on 2026-12-06 20:38, goal 1.3x) with the one-token MoE kernels' tiles and the route kernel's warps swept (they
# were chosen on an H100): the 1B llama against its MoEfied copy (16 experts, centroid router), top 4, every set in
# one process with the dense model as the baseline, profiled, and the out kernel adding its products atomically
# (PallasOptions.atomic; bench_sparse_decode.py; PALLAS overrides the sets).
[ -n "$ANY_GPU" ] || nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 || exit 3  # ANY_GPU=1: any card
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
SETS="${PALLAS:-route=1;atomic=1;route_warps=8;token_out=128;token_width=256;token_inner=256;token_out=128,token_width=256;atomic=1,token_out=128}"
timeout ${LIMIT:-540} python3 scripts/bench_sparse_decode.py --shape 1b --new_tokens 256 --repeats ${REPEATS:-3} --modes pallas --top_k 4 --profile /tmp/prof --pallas "$SETS" --out $OUT/sweep.jsonl > $OUT/sweep.log 2>&1; el sweep $?
grep -v '^{' $OUT/sweep.log | grep -v "^  " | tail -14 | cut -c1-200; grep "^  .*moe_" $OUT/sweep.log | cut -c1-120

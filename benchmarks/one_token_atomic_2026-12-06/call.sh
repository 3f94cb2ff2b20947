# One call (carry .gpu/whl, .gpu/anchors; kind nvidia-h200, ~7 min): issue 14's 135M batch-1 decode step with the
# residual stream in float32 and the o and down products added into it by atomic adds (OneTokenMatmuls.
# residual_atomic: five kernels per layer instead of seven) against the one-token layers as shipped, A B A B in one
# process, profiled, with transformers + static cache + torch.compile after them (the same-call ratio); check.py's
# numerics of the atomic layers against the modules; then the batched merge's host/device split
# (benchmarks/merge_host_2026-12-06/batched_host.py, linear and task_arithmetic, then ties).
[ -n "$ANY_GPU" ] || nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 || exit 3  # ANY_GPU=1: any card
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader | tee $OUT/gpu.txt
B="python3 scripts/bench_generate.py --shape 135m --batch 1 --repeats 3 --profile /tmp/pa"
timeout ${LIMIT_A:-240} $B --one_token 1,residual_atomic=1,1,residual_atomic=1 --anchor .gpu/anchors/hf_generate.py --anchor_modes static --out $OUT/atomic.jsonl > $OUT/atomic.log 2>&1; el atomic $?
python3 benchmarks/one_token_h100_2026-12-05/summary.py $OUT/atomic.jsonl; grep -i "error" $OUT/atomic.log | tail -3 | cut -c1-300
timeout 70 python3 benchmarks/one_token_layer_2026-12-06/check.py 135m residual_atomic=1 > $OUT/check.log 2>&1; el check $?; grep -i "greedy\|logit" $OUT/check.log | head -4
timeout 150 python3 benchmarks/merge_host_2026-12-06/batched_host.py $OUT/merge_host > $OUT/merge_host.log 2>&1; el merge_host $?; grep -v Warning $OUT/merge_host.log | tail -12 | cut -c1-200
METHODS=ties ITERS=5 timeout 90 python3 benchmarks/merge_host_2026-12-06/batched_host.py $OUT/merge_host_ties > $OUT/merge_host_ties.log 2>&1; el ties $?; grep -v Warning $OUT/merge_host_ties.log | tail -6 | cut -c1-200
timeout ${LIMIT_K:-150} python3 scripts/bench_merge.py --workdir /tmp/bm --size 1b --device gpu --kernels_only --methods linear,task_arithmetic --kernel_iters 10 --out $OUT/kernels_only.json > $OUT/kernels_only.log 2>&1; el kernels_only $?; grep kernel_batched $OUT/kernels_only.log | cut -c1-250
timeout 60 python3 benchmarks/one_token_atomic_2026-12-06/step_hlo.py $OUT 135m 2>&1 | tail -2; el step_hlo $?

# Issue 13's sparse decode speed-up: the 1B llama (random bf16 weights) against its MoEfied copy (16 experts,
# centroid router) at batch 1, the dense model the baseline in the same run: top 4 and top 2 of 16 with the
# one-token kernels, routing in route_kernel (the default) and with XLA (route=0), each row profiled (kernels per
# decode step). Run on an H100 on 2026-12-05 (benchmarks/sparse_decode_h100_2026-12-05/; the tile sweep there
# used the general fields' names); the issue asks for an H200. ~3 min with the machine warm. PALLAS overrides the
# option sets (e.g. "decode=0;route=0;route=1").
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 scripts/bench_sparse_decode.py --shape 1b --new_tokens 256 --repeats 5 --modes pallas --out $OUT/sparse_decode.jsonl"
timeout ${LIMIT:-400} $B --top_k 4,2 --profile /tmp/prof --pallas "${PALLAS:-route=0;route=1}" > $OUT/sparse_decode.log 2>&1; el decode $?
grep -v '^{' $OUT/sparse_decode.log | grep -v "^  " | tail -8 | cut -c1-200; grep "^  .*moe_" $OUT/sparse_decode.log | cut -c1-120

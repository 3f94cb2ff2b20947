# Issue 13's sparse decode speed-up: the 1B llama (random bf16 weights) against its MoEfied copy (16 experts,
# centroid router) at batch 1, the dense model the baseline in the same run: top 4 and top 2 of 16 with the general
# Pallas kernels (decode=0) and the one-token split-K kernels (default tiles; products and dots), each row profiled
# (kernels per decode step). Run on an H100 on 2026-12-05 (benchmarks/sparse_decode_h100_2026-12-05/, where the
# tile sweep's options had the general fields' names); the issue asks for an H200. ~4 min with the machine warm.
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 scripts/bench_sparse_decode.py --shape 1b --new_tokens 256 --repeats 5 --modes pallas --out $OUT/sparse_decode.jsonl"
timeout 400 $B --top_k 4,2 --profile /tmp/prof --pallas "decode=0;matvec=1;matvec=0" > $OUT/sparse_decode.log 2>&1; el decode $?
grep -v '^{' $OUT/sparse_decode.log | grep -v "^  " | tail -10 | cut -c1-200; grep "^  .*moe_" $OUT/sparse_decode.log | cut -c1-120

# Issue 13's sparse decode speed-up: the 1B llama (random bf16 weights) against its MoEfied copy (16 experts,
# centroid router) at batch 1, the dense model the baseline in the same run: top 4 of 16 with the general Pallas
# kernels (decode=0) and the one-token split-K kernels (products / dots, several tile sizes), each row profiled
# (kernels per decode step); then top 2 of 16. ~5 min with the machine warm; no carried inputs beyond the wheels.
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 scripts/bench_sparse_decode.py --shape 1b --new_tokens 128 --repeats 3 --modes pallas --out $OUT/sparse_decode.jsonl"
V="decode=0;matvec=1;matvec=1,neurons=64,width=128,inner=128,out=64;matvec=0,neurons=64,width=128,inner=128,out=64"
V="$V;matvec=1,neurons=128,width=64,inner=256,out=64;matvec=1,neurons=64,width=256,inner=128,out=128,num_warps=8"
timeout 390 $B --top_k 4 --profile /tmp/prof4 --pallas "$V" > $OUT/k4.log 2>&1; el k4 $?
grep -v '^{' $OUT/k4.log | grep -v "^  " | tail -12 | cut -c1-200; grep "^  .*moe_\|^  .*reduce" $OUT/k4.log | cut -c1-120
timeout 150 $B --top_k 2 --pallas "decode=0;matvec=1,neurons=64,width=128,inner=128,out=64" > $OUT/k2.log 2>&1; el k2 $?
grep -v '^{' $OUT/k2.log | tail -6 | cut -c1-200

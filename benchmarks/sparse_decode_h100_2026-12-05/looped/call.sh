# Issue 13's sparse decode speed-up: the 1B llama (random bf16 weights) against its MoEfied copy (16 experts,
# centroid router) at batch 1, the dense model the baseline in the same run: top 4 of 16 with the general Pallas
# kernels (decode=0) and the one-token kernels (products / dots, four tile sizes), then top 2 of 16; each row
# profiled (kernels per decode step). ~5 min with the machine warm; no carried inputs beyond the tree.
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 scripts/bench_sparse_decode.py --shape 1b --new_tokens 128 --repeats 3 --modes pallas --out $OUT/sparse_decode.jsonl"
timeout 390 $B --top_k 4 --profile /tmp/prof4 --pallas "decode=0;matvec=1;matvec=1,width=64,inner=32;matvec=0;matvec=1,neurons=16,out=16,width=128;matvec=1,neurons=64,out=64,width=64,inner=32" > $OUT/k4.log 2>&1; el k4 $?
grep -v '^{' $OUT/k4.log | tail -60 | cut -c1-200
timeout 150 $B --top_k 2 --pallas "matvec=1;matvec=0" > $OUT/k2.log 2>&1; el k2 $?
grep -v '^{' $OUT/k2.log | tail -8 | cut -c1-200

# Ran at commit 35c6f5f (whole_below / whole_out were OneTokenMatmuls fields there; removed after this call).
# The last call of the session, short for the device time left: whole_column_matmul + gated_matmul
# (whole_below=2^21: every 135M projection) against the split-K kernels at 135M, batch 1; on an H200 first the
# MoEfied 1B decode at top 4 of 16 against dense (issue 13's machine; defaults, one-token kernels on).
source benchmarks/pending_gpu/env.sh
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo $GPU
if [[ $GPU == *H200* ]]; then
  timeout 120 python3 scripts/bench_sparse_decode.py --shape 1b --top_k 4 --new_tokens 256 --repeats 3 --modes pallas --out $OUT/sparse.jsonl > $OUT/sparse.log 2>&1; el sparse $?
  grep -v '^{' $OUT/sparse.log | tail -3 | cut -c1-200
fi
W=whole_below=2097152
timeout 110 python3 scripts/bench_generate.py --repeats 3 --batch 1 --shape 135m --one_token 1,$W,$W/whole_out=32 --out $OUT/whole_135m.jsonl > $OUT/whole_135m.log 2>&1; el whole_135m $?
python3 benchmarks/one_token_h100_2026-12-05/summary.py $OUT/whole_135m.jsonl

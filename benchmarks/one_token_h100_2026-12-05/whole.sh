# The fourth one-token call: whole_column_matmul (one program per column block over the whole of D, no float32
# partials, no XLA sum after it) against the split-K kernel, at 135M (profiled) and 1B, batch 1. ~4 min warm.
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 scripts/bench_generate.py --repeats 3 --batch 1"
W=whole_below=2097152
timeout 220 $B --shape 135m --one_token 1,$W,$W/whole_out=32,$W/whole_out=8,$W/num_warps=2 --profile /tmp/gw --out $OUT/whole_135m.jsonl > $OUT/whole_135m.log 2>&1; el whole_135m $?
timeout 150 $B --shape 1b --one_token 1,whole_below=10000000,whole_below=10000000/whole_out=32 --out $OUT/whole_1b.jsonl > $OUT/whole_1b.log 2>&1; el whole_1b $?
python3 benchmarks/one_token_h100_2026-12-05/summary.py $OUT/whole_135m.jsonl $OUT/whole_1b.jsonl

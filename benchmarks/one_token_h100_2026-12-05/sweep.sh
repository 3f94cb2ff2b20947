# The second one-token call (after the in-place fix, 24f56ed): at 135M, batch 1, lower min_elements (every
# projection of that shape is under the default 2^21) with tile variants, profiled; at 1B, batch 1, the tiles;
# at batch 64 both shapes with and without (nothing should change: x has 64 rows). ~4 min warm.
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 scripts/bench_generate.py --repeats 3"
timeout 200 $B --shape 135m --batch 1 --one_token 0,1,min_elements=262144,min_elements=262144/out=32,min_elements=262144/width=64 --profile /tmp/gp --out $OUT/small.jsonl > $OUT/small.log 2>&1; el small $?
timeout 200 $B --shape 1b --batch 1 --one_token 1,out=32,out=128,width=256,width=64,num_warps=8 --out $OUT/tiles.jsonl > $OUT/tiles.log 2>&1; el tiles $?
timeout 150 $B --shape 135m,1b --batch 64 --one_token 0,1 --out $OUT/b64.jsonl > $OUT/b64.log 2>&1; el b64 $?
python3 benchmarks/one_token_h100_2026-12-05/summary.py $OUT/small.jsonl $OUT/tiles.jsonl $OUT/b64.jsonl

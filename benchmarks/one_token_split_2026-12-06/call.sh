# One call (carry .gpu/whl, .gpu/anchors), issue 14's 135M batch-1 decode step: the one-token layers as shipped
# (aligned cache blocks: 0.692 ms per step on an H100) against OneTokenMatmuls.split_cache (one attention program per
# head and cache block of `keys` slots, the o_proj kernel's prologue combining the blocks), with blocks of 128 and 64
# slots, in one process, profiled; the check of the split layers against the modules; the anchor. ~5 min warm.
# It ran in a shorter form (BENCHMARKS.md "Fourth call"). split_cache is now the default: on later trees `1` is the
# split and `split_cache=0` the looped kernel.
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 scripts/bench_generate.py --shape 135m --batch 1 --repeats 3 --profile /tmp/pl"
timeout 240 $B --one_token 1,split_cache=1,split_cache=1/keys=64,split_cache=1/keys=32 --anchor .gpu/anchors/hf_generate.py --anchor_modes static --out $OUT/split.jsonl > $OUT/split.log 2>&1; el split $?
python3 benchmarks/one_token_h100_2026-12-05/summary.py $OUT/split.jsonl
timeout 80 python3 benchmarks/one_token_layer_2026-12-06/check.py 135m split_cache=1 > $OUT/check_split.log 2>&1; el check_split $?; grep greedy $OUT/check_split.log
timeout 100 $B --new 1024 --one_token 1,split_cache=1 --out $OUT/split_long.jsonl > $OUT/split_long.log 2>&1; el split_long $?
python3 benchmarks/one_token_h100_2026-12-05/summary.py $OUT/split_long.jsonl; grep -i "error" $OUT/*.log | tail -3 | cut -c1-300

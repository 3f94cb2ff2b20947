# As run on 2026-12-06 03:05 (BENCHMARKS.md "Third call"): at dd41d91 with two options added for the call
# (OneTokenMatmuls.o_in_attention, .residual_in_norm: both slower or equal, removed after it) and with
# aligned_one_token_layer.py = dd41d91's models/one_token_layer.py with ../one_token_layer_2026-12-06/aligned.patch
# (now in the package). It does not run on later trees; kept as the record of what the call did.
# One call (carry .gpu/whl, .gpu/anchors), issue 14's 135M batch-1 decode step: the one-token decoder layers as
# shipped (0.794 ms per step on an H200) against the two folds of 2026-12-06 (OneTokenMatmuls.o_in_attention:
# o_proj inside the attention kernel, split over the heads; residual_in_norm: x + o in the gate/up kernel's
# prologue), each alone and both, in one process, profiled; their check against the modules; then the same with
# the aligned cache blocks (one_token_layer_2026-12-06/aligned.patch on the tree before the folds, copied over the
# module for its rows) and the anchor. ~6 min warm.
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
D=benchmarks/one_token_fold_2026-12-06
B="python3 scripts/bench_generate.py --shape 135m --batch 1 --repeats 3 --profile /tmp/pl"
F="o_in_attention=1/residual_in_norm=1"
timeout 200 $B --one_token layers=0,1,o_in_attention=1,residual_in_norm=1,$F --out $OUT/folds.jsonl > $OUT/folds.log 2>&1; el folds $?
python3 benchmarks/one_token_h100_2026-12-05/summary.py $OUT/folds.jsonl
timeout 80 python3 benchmarks/one_token_layer_2026-12-06/check.py 135m $F > $OUT/check_folds.log 2>&1; el check_folds $?; cat $OUT/check_folds.log | grep greedy
cp $D/aligned_one_token_layer.py configurable_fm/models/one_token_layer.py
timeout 80 python3 benchmarks/one_token_layer_2026-12-06/check.py 135m > $OUT/check_aligned.log 2>&1; el check_aligned $?; grep greedy $OUT/check_aligned.log
timeout 200 $B --one_token 1 --anchor .gpu/anchors/hf_generate.py --anchor_modes static --out $OUT/aligned.jsonl > $OUT/aligned.log 2>&1; el aligned $?
python3 benchmarks/one_token_h100_2026-12-05/summary.py $OUT/aligned.jsonl; grep -i "error" $OUT/*.log | tail -3 | cut -c1-300

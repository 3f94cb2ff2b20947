# Third call (carry .gpu/whl, .gpu/anchors): the layers with aligned cache blocks and one-load prologues (after
# the H200 call, 0.794 ms at 78c5dbb). The check at 135M, then batch-1 decode at 135M with the one-token products
# alone (layers=0) and with the layers (the default), each profiled, and the anchor after them in the same process.
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
D=benchmarks/one_token_layer_2026-12-06
timeout 70 python3 $D/check.py 135m > $OUT/check.log 2>&1; el check $?; grep "greedy" $OUT/check.log
timeout 200 python3 scripts/bench_generate.py --shape 135m --batch 1 --repeats 3 --one_token layers=0,1 --profile /tmp/pl --anchor .gpu/anchors/hf_generate.py --anchor_modes static --out $OUT/layers.jsonl > $OUT/layers.log 2>&1; el layers $?
python3 benchmarks/one_token_h100_2026-12-05/summary.py $OUT/layers.jsonl; grep -i "error" $OUT/layers.log | tail -3 | cut -c1-300

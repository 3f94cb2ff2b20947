# Third call (carry .gpu/whl, .gpu/anchors): the one-token layers as shipped (measured on the H200: 0.794 ms per
# step at 135M, batch 1) against the same with aligned.patch applied (whole cache blocks at multiples of `keys` plus
# one static tail block, the norm's row and the partial rows in one masked load each; lowered for CUDA and tested
# in interpret mode on the CPU, never run on a GPU, so kept out of the default path until this call). Each tree:
# the check at 135M, then batch-1 decode at 135M with the products alone (layers=0) and with the layers, profiled;
# the anchor once, after the patched rows.
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
D=benchmarks/one_token_layer_2026-12-06
B="python3 scripts/bench_generate.py --shape 135m --batch 1 --repeats 3 --profile /tmp/pl"
timeout 150 $B --one_token layers=0,1 --out $OUT/shipped.jsonl > $OUT/shipped.log 2>&1; el shipped $?
python3 benchmarks/one_token_h100_2026-12-05/summary.py $OUT/shipped.jsonl
patch -p1 < $D/aligned.patch | tail -1
timeout 70 python3 $D/check.py 135m > $OUT/check.log 2>&1; el check $?; grep "greedy" $OUT/check.log
timeout 200 $B --one_token 1 --anchor .gpu/anchors/hf_generate.py --anchor_modes static --out $OUT/aligned.jsonl > $OUT/aligned.log 2>&1; el aligned $?
python3 benchmarks/one_token_h100_2026-12-05/summary.py $OUT/aligned.jsonl; grep -i "error" $OUT/*.log | tail -3 | cut -c1-300

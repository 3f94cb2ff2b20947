# The one-token decoder layers on the GPU (carry .gpu/whl, .gpu/anchors): the check against the modules' step, then
# batch-1 decode at 135M and 1B with the one-token products alone (the shipped default) and with the layers, each
# profiled, a tile sweep at 135M, then 135M with the layers against transformers + static cache + torch.compile in the same process.
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
D=benchmarks/one_token_layer_2026-12-06
timeout 120 python3 $D/check.py > $OUT/check.log 2>&1; el check $?; grep "greedy" $OUT/check.log; grep -i "error" $OUT/check.log | tail -3 | cut -c1-300
timeout 200 python3 scripts/bench_generate.py --shape 135m,1b --batch 1 --repeats 3 --one_token 1,layers=1 --profile /tmp/pl --out $OUT/layers.jsonl > $OUT/layers.log 2>&1; el layers $?
python3 benchmarks/one_token_h100_2026-12-05/summary.py $OUT/layers.jsonl; grep -i "error" $OUT/layers.log | tail -3 | cut -c1-300
timeout 110 python3 scripts/bench_generate.py --shape 135m --batch 1 --repeats 3 --one_token layers=1/out=32,layers=1/out=128,layers=1/width=64,layers=1/keys=128,layers=1/num_warps=2 --out $OUT/sweep.jsonl > $OUT/sweep.log 2>&1; el sweep $?
python3 benchmarks/one_token_h100_2026-12-05/summary.py $OUT/sweep.jsonl
timeout 150 python3 scripts/bench_generate.py --shape 135m --batch 1 --repeats 3 --one_token layers=1 --anchor .gpu/anchors/hf_generate.py --anchor_modes static --out $OUT/anchor.jsonl > $OUT/anchor.log 2>&1; el anchor $?
python3 benchmarks/one_token_h100_2026-12-05/summary.py $OUT/anchor.jsonl

# 2026-12-06b call A (carry .gpu/whl, .gpu/anchors; timeout_s 590): issue 14's same-call anchor for the split
# attention (the default one-token layers, `1`, against the looped attention kernel, `split_cache=0`, and
# transformers' static-cache + torch.compile generate, 135M batch 1, one process), then sparse_decode.sh (issue 13,
# LIMIT=330). Total bounded at ~560 s by the timeouts. ONE_TOKEN overrides the option sets (next: "1,split_cache=0/keys=128,split_cache=0").
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
timeout 200 python3 scripts/bench_generate.py --shape 135m --batch 1 --repeats 3 --one_token "${ONE_TOKEN:-1,split_cache=0}" --anchor .gpu/anchors/hf_generate.py --anchor_modes static --out $OUT/split_anchor.jsonl > $OUT/split_anchor.log 2>&1; el split_anchor $?
python3 benchmarks/one_token_h100_2026-12-05/summary.py $OUT/split_anchor.jsonl; grep -i "error" $OUT/split_anchor.log | tail -3 | cut -c1-300
LIMIT=330 bash benchmarks/pending_gpu/sparse_decode.sh; el sparse_decode $?

# The third one-token call (min_elements 2^18, the kernels read in place): batch 1 and 64 at 135M and 1B with and
# without the one-token kernels, then transformers + static cache + torch.compile (the anchor) in the same call.
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 480 python3 scripts/bench_generate.py --shape 135m,1b --batch 1,64 --repeats 3 --one_token 0,1 --anchor .gpu/anchors/hf_generate.py --anchor_modes static --out $OUT/anchor.jsonl > $OUT/anchor.log 2>&1; el anchor $?
python3 benchmarks/one_token_h100_2026-12-05/summary.py $OUT/anchor.jsonl

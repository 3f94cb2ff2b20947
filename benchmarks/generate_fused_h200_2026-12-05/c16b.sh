# c16 in one call: one round old (8f4dc8a) vs new (fused decode projections), then the static-cache anchor
set -x
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv
PYTHONPATH=$PWD/.gpu/old16:$PWD timeout 140 python3 scripts/bench_generate.py --shape 135m,1b --batch 1,64 \
  --repeats 3 --out $OUT/old_r1.jsonl 2>&1 | grep -v "^W\|^I0\|Warning" | cut -c1-300 | tail -5
PYTHONPATH=$PWD timeout 140 python3 scripts/bench_generate.py --shape 135m,1b --batch 1,64 \
  --repeats 3 --out $OUT/new_r1.jsonl 2>&1 | grep -v "^W\|^I0\|Warning" | cut -c1-300 | tail -5
PYTHONPATH=$PWD/.gpu/old16:$PWD timeout 70 python3 scripts/bench_generate.py --shape 135m --batch 1 \
  --repeats 3 --out $OUT/old_r2.jsonl 2>&1 | tail -2 | cut -c1-300
PYTHONPATH=$PWD timeout 70 python3 scripts/bench_generate.py --shape 135m --batch 1 \
  --repeats 3 --out $OUT/new_r2.jsonl 2>&1 | tail -2 | cut -c1-300
PYTHONPATH=$PWD timeout 200 python3 scripts/bench_generate.py --shape 135m --batch 1 --repeats 3 \
  --anchor .gpu/anchors/hf_generate.py --anchor_modes static --out $OUT/anchor_static.jsonl 2>&1 | tail -4 | cut -c1-300

# c12.sh: (1) where one unmerged rank-8 LoRA's extra time goes at 1B x 64 x 512 (bench_adapters routing --profile);
# (2) the 1B train step's kernels mapped to HLO: bench_train --profile with an XLA dump of the optimized HLO.
set -x
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/ml_collections*.whl
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv
python3 scripts/bench_adapters.py --shape 1b --batch 64 --seq 512 --benches routing --rank 8 --mixed_path gather \
  --encoder random:.gpu/tok/tokenizer.json --profile /tmp/prof_lora --out $OUT/routing_1b_profile.jsonl 2>&1 | cut -c1-400 | tail -4
XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=NONE" \
  python3 scripts/bench_train.py --variant 1b --seq_len 2048 --grid 8:none --steps 10 --warmup 2 --profile /tmp/prof_train \
  --out $OUT/train_profile.jsonl 2>&1 | cut -c1-400 | tail -4
ls -laS /tmp/hlo | head -8
big=$(ls -S /tmp/hlo/*after_optimizations.txt | head -1); gzip -c "$big" > $OUT/train_step_after_optimizations.txt.gz
find /tmp/prof_train -name '*.trace.json.gz' -size -40M -exec cp {} $OUT/train_trace.json.gz \;
find /tmp/prof_lora -name '*.trace.json.gz' -size -20M | while read f; do cp "$f" $OUT/lora_$(echo "$f" | cut -d/ -f4).trace.json.gz; done
ls -la $OUT

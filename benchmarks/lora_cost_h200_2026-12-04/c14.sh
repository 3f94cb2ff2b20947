# c14.sh: the LoRA scale on the (..., r) intermediate (this tree) against on the (..., out) product (.gpu/old/:
# the committed modules.py and mixed.py), same bench script: routing rows at 1B and 135M, then the 1B train steps.
set -x
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/ml_collections*.whl
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv
NEW=$PWD; TOK=$PWD/.gpu/tok/tokenizer.json
rm -rf /tmp/old && mkdir -p /tmp/old && tar --exclude=./.gpu -cf - . | tar -C /tmp/old -xf -
cp .gpu/old/modules.py .gpu/old/mixed.py /tmp/old/configurable_fm/bricks/adapters/
for a in "--shape 1b --batch 64 --seq 512" "--shape 135m --batch 50 --seq 192"; do
  for tree in /tmp/old $NEW; do
    tag=$( [ $tree = $NEW ] && echo new || echo old )
    (cd $tree && PYTHONPATH=/tmp/site:$tree python3 scripts/bench_adapters.py $a --benches routing --rank 8 \
      --mixed_path gather --encoder random:$TOK --out $OUT/routing_$tag.jsonl 2>&1 | grep '"routing"' | cut -c1-900)
  done
done
for tree in /tmp/old $NEW; do
  tag=$( [ $tree = $NEW ] && echo new || echo old )
  (cd $tree && PYTHONPATH=/tmp/site:$tree python3 scripts/bench_adapters.py --shape 1b --batch 64 --seq 512 --steps 10 \
    --warmup 2 --train_batch 16 --rank 16 --benches train --no_peft --out $OUT/train_$tag.jsonl 2>&1 | grep '"train"\|summary' | cut -c1-400)
done

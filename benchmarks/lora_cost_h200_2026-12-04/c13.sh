# c13.sh: (1) where XLA puts a LoRA's sum (lora_fuse.py); (2) the routing rows after forward_call passes the state
# as a flat list (1B 64 x 512 and 135M 50 x 192), base and one-adapter forwards timed the same way.
set -x
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/ml_collections*.whl
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv
python3 .gpu/cmd/lora_fuse.py 512 > $OUT/lora_fuse.jsonl; cat $OUT/lora_fuse.jsonl
for a in "--shape 1b --batch 64 --seq 512" "--shape 135m --batch 50 --seq 192"; do
  python3 scripts/bench_adapters.py $a --benches routing --rank 8 --mixed_path gather \
    --encoder random:.gpu/tok/tokenizer.json --out $OUT/routing_flat.jsonl 2>&1 | grep '"routing"' | cut -c1-700
done

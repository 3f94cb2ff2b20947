set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
cp .gga/part /tmp/gguf_a
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
t0=$(date +%s)
timeout 250 python3 scripts/bench_adapters.py --shape 1b --batch 64 --seq 512 --steps 10 --warmup 2 --train_batch 16 --rank 16 --benches train --out $OUT/bench_train_1b.jsonl > $OUT/bench_train.log 2>&1; echo "bench rc=$? $(( $(date +%s)-t0 ))s"; tail -12 $OUT/bench_train.log
t0=$(date +%s)
timeout 300 python3 scripts/bench_edit.py --random_init --tokenizer .gpt/smollm2_tokenizer.json --stats_tokens 1048576 --rome_edits 5 --memit_calls 3 --out $OUT/bench_edit.json > $OUT/bench_edit.log 2>&1; echo "edit rc=$? $(( $(date +%s)-t0 ))s"; tail -8 $OUT/bench_edit.log

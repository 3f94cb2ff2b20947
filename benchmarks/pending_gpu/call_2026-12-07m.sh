# First call of the "m" session (kind nvidia-h200; carry .gpu/whl, .gpu/anchors, .gpu/stok): on an H200 the
# one-token atomic call (issue 14); on another card bench_edit's statistics row re-measured after the host-flush
# change (issue 10; .gpu/stok: SmolLM2's tokenizer.json written from its GGUF), then AlphaEdit over layers 0-2.
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  bash benchmarks/one_token_atomic_2026-12-06/call.sh
else
  source benchmarks/pending_gpu/env.sh
  nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
  timeout 240 python3 scripts/bench_edit.py --random_init --tokenizer .gpu/stok/tokenizer.json --rome_edits 5 \
    --memit_calls 2 --out $OUT/bench_edit.json > $OUT/bench_edit.log 2>&1; el edit $?
  grep -v Warning $OUT/bench_edit.log | tail -12 | cut -c1-250
  TL=250 XT=1 bash benchmarks/lifelong_wide_2026-12-07/alphaedit_l012.sh
fi

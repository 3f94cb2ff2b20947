# The routing bench with the LoRA term evaluated 'joint' and 'auto' (bricks.adapters.with_lora_matmul) beside the
# separate sum, in rotated rounds; then the 1B training step with XLA's default GEMMs against cuBLAS alone without
# autotuning, loop and scanned, ROUNDS (default 2) rounds in alternation, and the transformers + torch.compile anchor
# in the same call.
source benchmarks/pending_gpu/env.sh
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
timeout 170 python3 scripts/bench_adapters.py --shape 1b --batch 64 --seq 512 --benches routing --rank 8 --mixed_path gather --encoder random:$PWD/.gpu/tok/tokenizer.json --lora_matmul joint,auto --out $OUT/routing_matmul.jsonl > /dev/null 2> $OUT/routing_matmul.err; el routing $?
CUBLAS="--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=0"
for r in $(seq ${ROUNDS:-2}); do for f in "" "$CUBLAS"; do for s in "" "--scan_layers"; do
  XLA_FLAGS="$f" timeout 70 python3 scripts/bench_train.py --variant 1b --seq_len 2048 --grid 8:none $s --steps 10 --warmup 2 --out $OUT/gemm_ab.jsonl > /dev/null 2>&1; el "r$r[$f]$s" $?
done; done; done
# the anchor runs after our rows while this process holds its JAX memory pool: 0.92 of an 80 GB card left torch too
# little (CUDA out of memory on the H100, 2026-12-05); the 1B step's peak is 37.2 GiB, the anchor's 32.1 GiB (H200 run)
XLA_PYTHON_CLIENT_MEM_FRACTION=0.55 timeout 200 python3 scripts/bench_train.py --variant 1b --seq_len 2048 --grid 8:none --steps 10 --warmup 2 --anchor .gpu/anchors/torch_train.py --out $OUT/gemm_ab.jsonl 2>&1 | grep '"anchor"\|"summary"' | cut -c1-300; el anchor $?
python3 -c "
import json
for l in open('$OUT/routing_matmul.jsonl'): r=json.loads(l); print({k: round(v,4) for k, v in r.items() if 'interleaved' in k})
for l in open('$OUT/gemm_ab.jsonl'): r=json.loads(l); print(r) if 'step_s' not in r else print(r['scan_layers'], r['xla_flags'][-20:], round(r['step_s'],4), round(r['mfu'],4), round(r['compile_s'],2))
"

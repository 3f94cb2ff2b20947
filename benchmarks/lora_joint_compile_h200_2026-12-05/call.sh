# routing with the joint LoRA matmul; compile with a per-fusion autotune cache (cold, warm) and the step with it;
# 1B step default vs cuBLAS-only without autotuning; the K-concat microbench
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
t0=$(date +%s); el() { echo "== $1 rc=$2 $(( $(date +%s)-t0 ))s"; }
B="scripts/bench_train.py --variant 1b --seq_len 2048"
timeout 150 python3 scripts/bench_adapters.py --shape 1b --batch 64 --seq 512 --benches routing --rank 8 --mixed_path gather --encoder random:$PWD/.gpu/tok/tokenizer.json --lora_matmul joint --out $OUT/routing_joint.jsonl > /dev/null 2> $OUT/routing_joint.err; el routing_joint $?
for r in cold warm; do XLA_FLAGS=--xla_gpu_per_fusion_autotune_cache_dir=/tmp/atc timeout 60 python3 $B --grid 8:none --scan_layers --compile_only --out $OUT/flags.jsonl > /dev/null 2>&1; el "atc_$r" $?; done
XLA_FLAGS=--xla_gpu_per_fusion_autotune_cache_dir=/tmp/atc timeout 70 python3 $B --grid 8:none --scan_layers --steps 10 --warmup 2 --out $OUT/flags.jsonl > /dev/null 2>&1; el atc_steps $?
for f in "--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=0"; do
  XLA_FLAGS="$f" timeout 70 python3 $B --grid 8:none --steps 10 --warmup 2 --out $OUT/flags.jsonl > /dev/null 2>&1; el "loop[$f]" $?
done
timeout 100 python3 benchmarks/lora_joint_compile_h200_2026-12-05/lora_kconcat.py 512 > $OUT/kconcat.jsonl 2> $OUT/kconcat.err; el kconcat $?
python3 -c "
import json
for l in open('$OUT/routing_joint.jsonl'): r=json.loads(l); print({k: round(v,4) for k, v in r.items() if 'ratio' in k or k.endswith('interleaved_s')})
for l in open('$OUT/flags.jsonl'): r=json.loads(l); print(r['scan_layers'], r['remat'], r['xla_flags'][-30:], r.get('step_s'), r.get('mfu'), round(r['compile_s'],2))
for l in open('$OUT/kconcat.jsonl'): r=json.loads(l); print(r['din'], r['dout'], r['variant'], round(r['ms'],3))
"

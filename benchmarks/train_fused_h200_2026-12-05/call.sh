# c1: GGUF half A to /tmp; bench_train 1B fused A/B (2 rounds) + torch.compile anchor; scan compile vs autotuner;
# routing cost in rotated rounds (issue 12)
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
cp .gpu/ga/part.xz /tmp/ga.xz
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
t0=$(date +%s); el() { echo "== $1 rc=$2 $(( $(date +%s)-t0 ))s"; }
for r in 1 2; do
  timeout 120 python3 scripts/bench_train.py --variant 1b --seq_len 2048 --grid 8:none --fuse_projections 0,1 --steps 10 --warmup 2 --out $OUT/train_fused.jsonl 2>&1 | grep -v "^W\|^I0\|Warn" | tail -3 | cut -c1-400; el fused$r $?
done
timeout 150 python3 .gpu/anchors/torch_train.py 8 compile 2>&1 | tail -2 | tee $OUT/anchor.log; el anchor $?
for f in "" "--xla_gpu_autotune_level=0" "--xla_gpu_autotune_level=1" "--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=0"; do
  XLA_FLAGS="$f" timeout 60 python3 scripts/bench_train.py --variant 1b --seq_len 2048 --grid 8:dots --scan_layers --compile_only --out $OUT/scan_compile.jsonl 2>&1 | grep -o '"compile_s[^,]*,\|"compile_cpu_s[^,]*,' | tr '\n' ' '; el "compile[$f]" $?
done
for f in "" "--xla_gpu_autotune_level=0"; do
  XLA_FLAGS="$f" timeout 80 python3 scripts/bench_train.py --variant 1b --seq_len 2048 --grid 8:none --scan_layers --steps 6 --warmup 2 --out $OUT/scan_steps.jsonl 2>&1 | grep -o '"compile_s[^,]*,\|"mfu[^,]*,\|"step_s[^,]*,' | tr '\n' ' '; el "steps[$f]" $?
done
timeout 200 python3 scripts/bench_adapters.py --shape 1b --batch 64 --seq 512 --benches routing --rank 8 --mixed_path gather --encoder random:$PWD/.gpu/tok/tokenizer.json --out $OUT/routing.jsonl 2>&1 | grep '"routing"' | cut -c1-1500; el routing $?
ls -la /tmp/ga.xz

# c15.sh: the decode step under XLA flags that may cut kernels per layer (each variant its own process; an unknown
# flag only fails its own row). 135M, batch 1 and 64, greedy; the kernel profile for batch 1 of each variant.
set -x
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv
i=0
for f in "" "--xla_gpu_triton_gemm_any=true" "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"; do
  i=$((i+1))
  echo "=== variant $i: XLA_FLAGS='$f'"
  XLA_FLAGS="$f" timeout 65 python3 scripts/bench_generate.py --shape 135m --batch 1 --repeats 3 \
    --profile /tmp/prof_gen_$i --out $OUT/gen_flags_$i.jsonl 2>&1 | grep -v "^W\|^I0\|Warning" | cut -c1-330 | tail -8
  echo "{\"variant\": $i, \"xla_flags\": \"$f\"}" >> $OUT/gen_flags_$i.jsonl
done

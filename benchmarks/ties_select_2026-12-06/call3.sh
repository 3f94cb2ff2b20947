# Call 3: profile_ties.py (the ties group, task_arithmetic for contrast, the selection alone: it ran with 15, 31
# and 63 thresholds per pass, now 1, 3 and 15) with the merge kernels' optimized HLO dumped, then the masks on the
# GPU and bench_merge's kernel-only ties rows. Call 2 ran the profile alone, in an earlier form (one selection row,
# the scatter rounds). One MLP group of the 1.1B benchmark (22 x 5632 x 2048). Carry .gpu/whl. From the repository
# root:  bash benchmarks/ties_select_2026-12-06/call3.sh     (timeout_s 420; ~3 min)
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=NONE --xla_dump_hlo_module_re=.*(fused|lambda).*" \
  timeout 200 python3 benchmarks/ties_select_2026-12-06/profile_ties.py /tmp/pt > $OUT/profile_ties.jsonl 2> $OUT/profile_ties.err
el profile $?
tail -3 $OUT/profile_ties.err | cut -c1-300
python3 - <<'PY'
import json, os
for r in map(json.loads, open(os.environ["OUT"] + "/profile_ties.jsonl")):
    print({k: r.get(k) for k in ("method", "what", "splits", "seconds", "tb_per_s", "categories")})
    for k in (r.get("top") or [])[:12]:
        print("   ", k)
PY
cat /tmp/hlo/*jit_fused*gpu_after_optimizations.txt | gzip > $OUT/merge_kernels_after_optimizations.txt.gz
# the masks on the GPU, then the kernel-only rows of bench_merge (ties, every tensor of the 1.1B model)
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/ops/merge/test_sparsify.py 2>&1 | tail -2; el test_sparsify $?
timeout 150 python3 scripts/bench_merge.py --workdir /tmp/bm --size 1b --device gpu --kernels_only --methods ties \
  --kernel_iters 5 --out /tmp/bench_ties.json > /tmp/bench_ties.log 2>&1; el bench_ties $?
grep -h '"kind"' /tmp/bench_ties.log | tee $OUT/bench_ties.jsonl | cut -c1-250

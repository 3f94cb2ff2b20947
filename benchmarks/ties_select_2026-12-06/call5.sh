# Call 5: the selection alone with 1, 2, 3, 4, 5 and 7 thresholds per pass (call 3 measured 3 faster than 1:
# 6.06 against 9.55 ms), then, with the package's _SPLITS set to SEL (default 3; the package has 7 since this
# call) on the machine's copy, the ties group, the masks' tests and bench_merge's kernel-only ties rows. Carry
# .gpu/whl. From the repository root:
#   bash benchmarks/ties_select_2026-12-06/call5.sh     (timeout_s 420; ~3 min)
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
summary='import json,sys
for r in map(json.loads, open(sys.argv[1])):
    top = [k for k in (r.get("top") or []) if k["name"] == "input_reduce_fusion"]
    print(r.get("method"), r.get("splits"), round(r["seconds"] * 1e3, 3), "ms",
          [(k["count"], round(k["mean_us"], 1)) for k in top])'
METHODS= SPLITS=${SPLITS:-1,2,3,4,5,7} timeout 150 python3 benchmarks/ties_select_2026-12-06/profile_ties.py /tmp/pt \
  > $OUT/select_sweep.jsonl 2> /tmp/sweep.err; el sweep $?
tail -2 /tmp/sweep.err | cut -c1-300; python3 -c "$summary" $OUT/select_sweep.jsonl
sed -i "s/^_SPLITS = [0-9]* /_SPLITS = ${SEL:-3} /" configurable_fm/ops/merge/sparsify.py; grep -n "^_SPLITS" configurable_fm/ops/merge/sparsify.py
METHODS=ties SPLITS= timeout 100 python3 benchmarks/ties_select_2026-12-06/profile_ties.py /tmp/pt2 \
  > $OUT/ties_group.jsonl 2> /tmp/group.err; el group $?
tail -2 /tmp/group.err | cut -c1-300; python3 -c "$summary" $OUT/ties_group.jsonl
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/ops/merge/test_sparsify.py 2>&1 | tail -2; el test_sparsify $?
timeout 150 python3 scripts/bench_merge.py --workdir /tmp/bm --size 1b --device gpu --kernels_only --methods ties \
  --kernel_iters 5 --out /tmp/bench_ties.json > /tmp/bench_ties.log 2>&1; el bench_ties $?
grep -h '"kind"' /tmp/bench_ties.log | tee $OUT/bench_ties.jsonl | cut -c1-250

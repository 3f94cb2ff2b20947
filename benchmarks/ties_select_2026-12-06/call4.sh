# Call 4: the selection alone (one MLP group, 22 x 5632 x 2048, one model) with 1, 3 and 7 thresholds per
# narrowing pass (call 3: 15, 31 and 63 all took 2.15 ms a pass against 0.32 ms for a single count). Carry
# .gpu/whl. From the repository root:  bash benchmarks/ties_select_2026-12-06/call4.sh   (timeout_s 120; ~30 s)
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
METHODS= SPLITS=1,3,7 timeout 90 python3 benchmarks/ties_select_2026-12-06/profile_ties.py /tmp/pt > $OUT/select.jsonl 2>&1
el select $?
python3 - <<'PY'
import json, os
for line in open(os.environ["OUT"] + "/select.jsonl"):
    if line.startswith("{"):
        r = json.loads(line)
        print(r["splits"], round(r["seconds"] * 1e3, 2), "ms;", [(k["name"], k["count"], round(k["mean_us"])) for k in r["top"][:4]])
PY

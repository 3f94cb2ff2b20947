# Issues 14 and 13: batch-1 decode with models/one_token.py's split-K kernels for the projections XLA reduces
# (operands under 10M elements: at the 1B shape the fused q/k/v and o_proj, ~0.8 / ~1.2 TB/s in the 2026-12-05 H100
# profiles), against the default, in one run: bench_generate at 135M and 1B, batch 1, each profiled (kernels per
# step); then the MoEfied 1B decode against dense with the option on in both (issue 13's ratio). ~6 min, warm.
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 300 python3 scripts/bench_generate.py --shape 135m,1b --batch 1 --repeats 3 --one_token 0,1 --profile /tmp/gp --out $OUT/one_token.jsonl > $OUT/one_token.log 2>&1; el one_token $?
python3 - $OUT/one_token.jsonl <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "step_ms" in r:
        print(r["shape"], "one_token", r["one_token"], "step_ms %.3f" % r["step_ms"], "tokens/s %.0f" % r["tokens_per_s"])
    elif "events_per_step" in r:
        print("  ", r["shape"], "one_token", r["one_token"], "kernels/step", r["events_per_step"], "busy_ms/step %.3f" % r["busy_ms_per_step"])
        for k in r["top"][:8]:
            print("     %5d x %7.2f us  %s" % (k["count"], k["mean_us"], k["name"][:80]))
PY
timeout 150 python3 scripts/bench_sparse_decode.py --shape 1b --top_k 4,2 --new_tokens 256 --repeats 5 --modes pallas --one_token 1 --out $OUT/sparse_one_token.jsonl > $OUT/sparse_one_token.log 2>&1; el sparse_one_token $?
grep -v '^{' $OUT/sparse_one_token.log | tail -5 | cut -c1-200

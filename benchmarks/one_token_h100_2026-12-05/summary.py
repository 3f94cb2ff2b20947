"""Prints bench_generate.py's rows (JSON lines) as the one-token calls' summaries: a step per row, the top kernels
of a profile row, the anchor's line.
    python3 benchmarks/one_token_h100_2026-12-05/summary.py ROWS.jsonl ..."""
import json
import sys

for path in sys.argv[1:]:
    for line in open(path):
        r = json.loads(line)
        if "anchor" in r:
            print("anchor", r["anchor"], r["shape"], r["batch"], r.get("line", "")[:100])
        elif "step_ms" in r:
            print(r["shape"], r["batch"], "one_token", r["one_token"], "step_ms %.3f" % r["step_ms"],
                  "tokens/s %.0f" % r["tokens_per_s"])
        elif "events_per_step" in r:
            print("  ", "kernels/step", r["events_per_step"], "busy_ms/step %.3f" % r["busy_ms_per_step"])
            for k in r["top"][:7]:
                print("     %5d x %7.2f us  %s" % (k["count"], k["mean_us"], k["name"][:60]))

# Issue 10: AlphaEdit (l2_rel 0.05, the `full` sizes' default) spread over layers 0-2 of the `full_wide` testbed, against
# layer 0 alone (benchmarks/lifelong_wide_2026-12-07/alphaedit_l2/: ES 68.0 at 1,000 edits). Any card; rerun on the
# same warm machine while it ends with rc=75 (state in /tmp/lw). TL: the time limit of this call's part.
mkdir -p /tmp/lw && [ -f /tmp/lw/trace.json ] || cp benchmarks/lifelong_wide_2026-12-07/trace.json /tmp/lw/
EDITORS=alphaedit@l012 EXTRA="--set alphaedit@l012.layers=0,1,2" TL=${TL:-400} XT=${XT:-200} \
  bash benchmarks/lifelong_wide_2026-12-07/call.sh

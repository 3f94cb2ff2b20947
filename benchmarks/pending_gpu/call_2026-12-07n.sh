# First call of the "n" session (kind nvidia-h200; carry .gpu/whl, .gpu/anchors): on an H200 the one-token atomic
# call (issue 14); on another card AlphaEdit over layers 0-2 of `full_wide` (issue 10), rerun on the warm machine
# while it ends with rc=75.
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  bash benchmarks/one_token_atomic_2026-12-06/call.sh
else
  TL=${TL:-480} XT=${XT:-45} bash benchmarks/lifelong_wide_2026-12-07/alphaedit_l012.sh
fi

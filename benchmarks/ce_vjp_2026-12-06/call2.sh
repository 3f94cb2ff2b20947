# The shipped next_token_nll (jax.lax.platform_dependent: the one-pass VJP on a GPU) against autodiff alone (the
# package file before, .gpu/ce/scoring_autodiff.py = `git show d856e11:configurable_fm/models/scoring.py`), the 1B
# step at 8 x 2048, A B A B in one call (README.md here). Carry .gpu/whl, .gpu/ce. From the repository root:
#   bash benchmarks/ce_vjp_2026-12-06/call2.sh     (timeout_s 300; ~2 min)
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
cp configurable_fm/models/scoring.py /tmp/scoring_shipped.py; cp .gpu/ce/scoring_autodiff.py /tmp/scoring_autodiff.py
bench() {  # $1: autodiff | shipped, $2: round
  cp /tmp/scoring_$1.py configurable_fm/models/scoring.py
  timeout 60 python3 scripts/bench_train.py --variant 1b --seq_len 2048 --grid 8:none --steps 10 --warmup 2 \
    > $OUT/$1_$2.log 2>&1; el "$1 round $2" $?
  grep -h '"step_s"' $OUT/$1_$2.log | python3 -c "import json,sys; [print('$1 $2', {k: r.get(k) for k in ('step_s','tokens_per_s','mfu','compile_s','loss')}) for r in map(json.loads, sys.stdin)]"
}
bench autodiff 1; bench shipped 1; bench autodiff 2; bench shipped 2
cp /tmp/scoring_shipped.py configurable_fm/models/scoring.py

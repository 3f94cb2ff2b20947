# Issue 14, 60% MFU: a custom VJP for next_token_nll (vjp.patch here: the backward as one elementwise pass writing
# the bf16 logits' gradient, softmax recomputed from the saved float32 logsumexp) against the shipped autodiff (a
# float32 (B, T, V) gradient, a scatter at the targets, then a cast), the 1B step at 8 x 2048, alternating A B A B
# in one call, then the transformers + torch.compile anchor with the shipped code. Not in the package: on the 2-core
# CPU the patch makes the tiny pre-training step (vocabulary 49152, width 64) 29% slower (benchmarks/ce_vjp_2026-12-06/
# README.md), so it lands only if the GPU gain is measured and the CPU path keeps autodiff. Carry .gpu/whl,
# .gpu/anchors, .gpu/ce (.gpu/ce/scoring_vjp.py: `git show 7599c2c:configurable_fm/models/scoring.py`, the package
# file with vjp.patch applied). From the repository root:  bash benchmarks/ce_vjp_2026-12-06/call.sh   (timeout_s
# 590; ~7 min)
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
cp configurable_fm/models/scoring.py /tmp/scoring_autodiff.py; cp .gpu/ce/scoring_vjp.py /tmp/scoring_vjp.py
bench() {  # $1: autodiff | vjp, $2: round
  cp /tmp/scoring_$1.py configurable_fm/models/scoring.py
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.55 timeout 150 python3 scripts/bench_train.py --variant 1b --seq_len 2048 --grid 8:none \
    --steps 10 --warmup 2 --out $OUT/$1_$2.jsonl > $OUT/$1_$2.log 2>&1; el "$1 round $2" $?
  grep -h '"step_s"' $OUT/$1_$2.jsonl | python3 -c "import json,sys; [print('$1 $2', {k: r.get(k) for k in ('step_s','tokens_per_s','mfu','compile_s','loss')}) for r in map(json.loads, sys.stdin)]"
}
bench autodiff 1; bench vjp 1; bench autodiff 2; bench vjp 2
cp /tmp/scoring_autodiff.py configurable_fm/models/scoring.py
XLA_PYTHON_CLIENT_MEM_FRACTION=0.55 timeout 200 python3 scripts/bench_train.py --variant 1b --seq_len 2048 --grid 8:none --steps 10 \
  --warmup 2 --anchor .gpu/anchors/torch_train.py --out $OUT/anchor.jsonl > $OUT/anchor.log 2>&1; el anchor $?
grep '"anchor"\|"summary"' $OUT/anchor.log | cut -c1-600; tail -2 $OUT/anchor.log | cut -c1-300

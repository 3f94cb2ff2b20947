# Issue 14's 135M decode (0.87 ms per step, 408 kernels, ~2.2 us each; goal 0.25 ms): do XLA's own fusions cut
# kernels per layer? Batch 1 at 135M, each row profiled, one process per setting: as shipped; XLA attention
# instead of cuDNN's (5.0 us per layer now); the block-level fusion rewriter (RMSNorm's reduce + multiply as one
# Triton kernel, if this XLA has it); the Triton softmax/normalization fusion flag. An unknown flag fails its row
# only. ~4 min warm.
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 scripts/bench_generate.py --shape 135m --batch 1 --repeats 3 --out $OUT/fusion.jsonl"
timeout 90 $B --profile /tmp/gf0 > $OUT/shipped.log 2>&1; el shipped $?
timeout 90 $B --attention xla --profile /tmp/gf1 > $OUT/xla_attention.log 2>&1; el xla_attention $?
XLA_FLAGS=--xla_gpu_experimental_enable_fusion_block_level_rewriter=true timeout 90 $B --profile /tmp/gf2 > $OUT/block_rewriter.log 2>&1; el block_rewriter $?
XLA_FLAGS=--xla_gpu_enable_triton_softmax_fusion=true timeout 90 $B --profile /tmp/gf3 > $OUT/softmax_fusion.log 2>&1; el softmax_fusion $?
python3 benchmarks/one_token_h100_2026-12-05/summary.py $OUT/fusion.jsonl

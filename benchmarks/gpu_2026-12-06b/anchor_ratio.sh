# Issue 14's same-call ratio: the 1B training step (bench_train.py, batch 8 x 2048) and the transformers +
# torch.compile anchor in one call, on an H200 (the anchor ran out of memory next to the JAX pool on an 80 GB H100
# at a 0.92 memory fraction; 0.55 leaves torch room on either card). ~4 min with the machine warm.
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
XLA_PYTHON_CLIENT_MEM_FRACTION=0.55 timeout 280 python3 scripts/bench_train.py --variant 1b --seq_len 2048 --grid 8:none --steps 10 --warmup 2 --anchor .gpu/anchors/torch_train.py --out $OUT/anchor_ratio.jsonl > $OUT/anchor_ratio.log 2>&1; el anchor $?
grep '"anchor"\|"summary"' $OUT/anchor_ratio.log | cut -c1-600; tail -3 $OUT/anchor_ratio.log | cut -c1-300

# The ties kernels on the GPU with the new top-k selection (sparsify._window_refine: a sampled bracket, then
# histograms of the bracket's keys) against the old one (32-step bisection and cumulative counts; the package
# files before, .gpu/ties/{sparsify,task_vectors}_old.py = `git show 3c2ebc1:configurable_fm/ops/merge/...`):
# scripts/bench_merge.py's kernel-only rows (every tensor of the 1.1B llama on the device, per tensor and
# batched by shape), new old new old in one call. Carry .gpu/whl, .gpu/ties. From the repository root:
#   bash benchmarks/ties_select_2026-12-06/call.sh     (timeout_s 560; ~5 min)
source benchmarks/pending_gpu/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
M=configurable_fm/ops/merge
cp $M/sparsify.py /tmp/sparsify_new.py; cp $M/task_vectors.py /tmp/task_vectors_new.py
cp .gpu/ties/sparsify_old.py /tmp/sparsify_old.py; cp .gpu/ties/task_vectors_old.py /tmp/task_vectors_old.py
bench() {  # $1: new | old, $2: round
  cp /tmp/sparsify_$1.py $M/sparsify.py; cp /tmp/task_vectors_$1.py $M/task_vectors.py
  timeout ${LIMIT:-120} python3 scripts/bench_merge.py --workdir /tmp/bm --size 1b --device gpu --kernels_only \
    --methods ties --kernel_iters 5 --out $OUT/$1_$2.json > $OUT/$1_$2.log 2>&1; el "$1 round $2" $?
  grep -h '"kind"' $OUT/$1_$2.log | python3 -c "import json,sys; [print('$1 $2', {k: r.get(k) for k in ('kind','seconds','tb_per_s','fraction_of_bound','kernels_compiled')}) for r in map(json.loads, sys.stdin)]"
}
bench new 1; bench old 1; bench new 2; bench old 2
cp /tmp/sparsify_new.py $M/sparsify.py; cp /tmp/task_vectors_new.py $M/task_vectors.py
# the masks on the GPU (rank_window_mask takes the new selection there) against the stable argsort reference
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/ops/merge/test_sparsify.py > $OUT/test_sparsify_gpu.log 2>&1; el "test_sparsify on the GPU" $?
tail -3 $OUT/test_sparsify_gpu.log

# After recovery_sparse_lora.sh on the same warm machine (reuses /tmp/smol.gguf, the code data and /tmp/sparse/ffn25):
# the same 25%-active model recovered by distillation from the dense model (moefy_recover.py:lora_sparse,code,kd),
# 3000 steps, re-calibrated to 75%, evaluated on the trainer's validation batches (read against the dense model).
source benchmarks/pending_gpu/env.sh
STEPS=${STEPS:-3000}
S="scripts/sparsify.py --config experiments/analysis/sparsify.py:quarter,code --config.calibration.tokenizer=/tmp/smol.gguf --config.evaluation.n_tokens=65536 --config.overwrite=True"
[ -d /tmp/sparse/ffn25 ] || { timeout 120 python3 $S --config.input=/tmp/smol.gguf --config.output=/tmp/sparse/ffn25 > $OUT/sparsify.log 2>&1; el sparsify $?; }
timeout 420 python3 scripts/train.py --config experiments/analysis/moefy_recover.py:lora_sparse,code,kd --workdir /tmp/rec/sk --config.init_from=/tmp/sparse/ffn25 --config.task.teacher=/tmp/smol.gguf --config.steps=$STEPS --config.eval_every=500 --config.checkpoint_every=$STEPS --config.progress=False $EXTRA > $OUT/sk.log 2>&1; el sparse_kd $?
timeout 90 python3 $S --config.input=/tmp/rec/sk/best --config.output=/tmp/sparse/recal_kd > $OUT/resparsify_kd.log 2>&1; el resparsify $?; cut -c1-400 $OUT/resparsify_kd.log
timeout 100 python3 scripts/train.py --config experiments/analysis/moefy_recover.py:eval,code --config.progress=False $EXTRA --workdir /tmp/rec/after_kd --config.init_from=/tmp/sparse/recal_kd > $OUT/after_kd.log 2>&1; el after_kd $?
for f in sk after_kd; do cp /tmp/rec/$f/metrics.jsonl $OUT/$f.jsonl 2>/dev/null; echo $f; grep -E "val_ppl" $OUT/$f.jsonl | grep -o '"step": [0-9]*\|"val_ppl": [0-9.]*' | paste -sd' '; grep -o '"tokens_per_s": [0-9.]*' $OUT/$f.jsonl | tail -1; done

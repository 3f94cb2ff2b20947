# 25% of the FFN neurons active by TEAL thresholds (scripts/sparsify.py :quarter, calibrated on code), recovered by
# moefy_recover.py:lora_sparse (attention + gate/up LoRA) against the same LoRA on the dense model, 3000 steps each
# in parallel; then the recovered model's thresholds re-calibrated to 75% and evaluated on the same batches.
# The GGUF: /tmp/smol.gguf from recovery_expert_lora.sh on the same warm machine, else /tmp/ga.xz + .gpu/gb.
# STEPS (default 3000) and EXTRA (more trainer flags) make a CPU dry run of the commands possible.
source benchmarks/pending_gpu/env.sh
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.3
[ -d /tmp/cfmdata/code ] || { timeout 120 python3 scripts/prepare_data.py --config experiments/data.py:code --config.tokenizer=/tmp/smol.gguf --config.code.packages="('numpy','jax','flax','optax','orbax','chex','transformers','torch')" > $OUT/prep.log 2>&1; el prep $?; }
S="scripts/sparsify.py --config experiments/analysis/sparsify.py:quarter,code --config.calibration.tokenizer=/tmp/smol.gguf --config.evaluation.n_tokens=65536 --config.overwrite=True"
STEPS=${STEPS:-3000}
R="scripts/train.py --config.steps=$STEPS --config.eval_every=500 --config.checkpoint_every=$STEPS --config.progress=False $EXTRA"
E="scripts/train.py --config experiments/analysis/moefy_recover.py:eval,code --config.progress=False $EXTRA"
(timeout $(( 560 - ($(date +%s)-t0) )) python3 $R --config experiments/analysis/moefy_recover.py:lora_sparse,code --workdir /tmp/rec/dl --config.init_from=/tmp/smol.gguf > $OUT/dl.log 2>&1; el dense_lora $?) &
timeout 120 python3 $S --config.input=/tmp/smol.gguf --config.output=/tmp/sparse/ffn25 > $OUT/sparsify.log 2>&1; el sparsify $?; cat $OUT/sparsify.log | cut -c1-400
timeout $(( 540 - ($(date +%s)-t0) )) python3 $R --config experiments/analysis/moefy_recover.py:lora_sparse,code --workdir /tmp/rec/sl --config.init_from=/tmp/sparse/ffn25 > $OUT/sl.log 2>&1; el sparse_lora $?
timeout 90 python3 $S --config.input=/tmp/rec/sl/best --config.output=/tmp/sparse/recal > $OUT/resparsify.log 2>&1; el resparsify $?; cat $OUT/resparsify.log | cut -c1-400
for m in /tmp/smol.gguf:dense /tmp/sparse/ffn25:before /tmp/sparse/recal:after; do (timeout 100 python3 $E --workdir /tmp/rec/${m#*:} --config.init_from=${m%:*} > $OUT/${m#*:}.log 2>&1; el ${m#*:} $?) & done
wait
for f in dl sl dense before after; do cp /tmp/rec/$f/metrics.jsonl $OUT/$f.jsonl 2>/dev/null; echo $f; grep -E "val_ppl" $OUT/$f.jsonl | grep -o '"step": [0-9]*\|"val_ppl": [0-9.]*' | paste -sd' '; grep -o '"tokens_per_s": [0-9.]*' $OUT/$f.jsonl | tail -1; done

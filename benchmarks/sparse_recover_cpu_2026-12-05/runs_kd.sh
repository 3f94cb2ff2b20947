# After runs.sh (its /tmp/sr/ffn25): the same recovery by distillation from the dense model (lora_sparse,stdlib,kd),
# STEPS steps of 4 x 256 stdlib tokens (default 60; STEPS=200 EVAL=50 gave the 200-step rows, named *_kd200), then
# re-calibrated to 75% and evaluated.
cd /work/main
STEPS=${STEPS:-60}; EVAL=${EVAL:-30}; S=$([ "$STEPS" = 60 ] || echo "$STEPS")
COMMON="--config.compute_dtype=float32 --config.mesh.shape=(1,1,1) --config.batch_size=4 --config.seq_len=256 --config.data.eval_batch_size=8 --config.data.max_eval_batches=4 --config.progress=False"
R=/tmp/sr
run() { name=$1; cfg=$2; shift 2; t=$(date +%s); timeout 3600 .venv/bin/python scripts/train.py --config $cfg --workdir $R/runs/$name $COMMON "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s)-t ))s"; }
run sparse_kd$S experiments/analysis/moefy_recover.py:lora_sparse,stdlib,kd --config.init_from=$R/ffn25 --config.steps=$STEPS --config.eval_every=$EVAL
t=$(date +%s)
.venv/bin/python scripts/sparsify.py --config experiments/analysis/sparsify.py:quarter --config.input=$R/runs/sparse_kd$S/best --config.calibration.tokenizer=smollm2-135m-instruct --config.output=$R/recalibrated_kd$S --config.overwrite=True > $R/resparsify_kd$S.log 2>&1; echo "resparsify rc=$? $(( $(date +%s)-t ))s"
run after_kd$S experiments/analysis/moefy_recover.py:eval,stdlib --config.init_from=$R/recalibrated_kd$S
echo done
